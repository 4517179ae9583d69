"""
goma-pt: Goma Gateway's passThrough entry point (TCP and UDP port
forwarding) as a Twisted service and twistd plugin.

For a C{.tac} file or your own application::

    from goma_twisted import PassThroughService, load_config
    PassThroughService(load_config("goma.yml")).setServiceParent(application)
"""

from .config import ConfigError, GatewayConfig, load_config
from .service import PassThroughService

__version__ = "0.1.0"
__all__ = ["ConfigError", "GatewayConfig", "PassThroughService", "load_config"]
