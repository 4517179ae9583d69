# goma-pt inside a Twisted application of your own, next to your services.
# Run it with:
#   twistd -n --pidfile= -y etc/goma-pt.tac
# The config is $GOMA_PT_CONFIG, or goma-pt.yaml beside this file.
# Set $GOMA_PT_METRICS (e.g. tcp:9108:interface=127.0.0.1) to serve /metrics.
# SIGHUP re-reads the config file, as for `twistd goma-pt` (without
# reload_signal, SIGHUP would end the process).
import os
import signal

from twisted.application import service

from goma_twisted import PassThroughService
from goma_twisted.config import load_config_or_exit

config_path = os.environ.get("GOMA_PT_CONFIG") or os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "goma-pt.yaml"
)

application = service.Application("goma-pt")
PassThroughService(
    # A config error ends twistd with the problems, without a traceback.
    load_config_or_exit(config_path),
    metrics=os.environ.get("GOMA_PT_METRICS") or None,
    reload_signal=signal.SIGHUP,
).setServiceParent(application)
