"""
The Containerfile and the Kubernetes manifests agree with each other and
with goma-pt: every manifest loads; the config path, ports, probes, options
and user they name are the ones the ConfigMap, the image and goma-pt's own
option parser provide. No container or cluster runs here: this is what can
be checked without one.
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import pytest
import yaml

from goma_twisted.config import GatewayConfig, load_config
from goma_twisted.tap import Options

from .support import ROOT

KUBERNETES = ROOT / "deploy" / "kubernetes"
CONTAINERFILE = ROOT / "Containerfile"


class Manifests:
    """Every document of every YAML file in deploy/kubernetes/, by kind."""

    def __init__(self, directory: Path) -> None:
        self.files = sorted(p.name for p in directory.glob("*.yaml"))
        self.documents: list[dict[str, Any]] = []
        for name in self.files:
            with open(directory / name) as f:
                # Several documents per file are allowed; empty ones skipped.
                self.documents += [d for d in yaml.safe_load_all(f) if d is not None]

    def one(self, kind: str) -> dict[str, Any]:
        found = [d for d in self.documents if d.get("kind") == kind]
        assert len(found) == 1, f"{len(found)} {kind} documents, expected 1"
        return found[0]

    @property
    def pod(self) -> dict[str, Any]:
        return self.one("Deployment")["spec"]["template"]

    @property
    def container(self) -> dict[str, Any]:
        [container] = self.pod["spec"]["containers"]
        return container

    @property
    def args(self) -> list[str]:
        return [str(arg) for arg in self.container["args"]]


@pytest.fixture(scope="module")
def manifests() -> Manifests:
    return Manifests(KUBERNETES)


@pytest.fixture
def config(manifests: Manifests, tmp_path: Path) -> GatewayConfig:
    """The ConfigMap's Goma config, loaded by goma-pt from a file."""
    path = tmp_path / "goma.yml"
    path.write_text(_config_text(manifests))
    return load_config(path)


def _config_text(manifests: Manifests) -> str:
    key = posixpath.basename(_option(manifests.args, "config"))
    return str(manifests.one("ConfigMap")["data"][key])


def _option(args: list[str], name: str) -> str:
    """The value of C{--name} in C{args} (C{--name VALUE} or C{--name=VALUE}), given once."""
    values = [
        args[i + 1] if arg == f"--{name}" else arg.split("=", 1)[1]
        for i, arg in enumerate(args)
        if arg == f"--{name}" or arg.startswith(f"--{name}=")
    ]
    assert len(values) == 1, f"--{name} given {len(values)} times in {args}"
    return values[0]


def _endpoint_port(description: str) -> int:
    """The port of a TCP server endpoint string: C{tcp:9108}, C{tcp:port=9108:interface=...}."""
    kind, *fields = description.split(":")
    assert kind in ("tcp", "tcp6"), description
    named = dict(f.split("=", 1) for f in fields if "=" in f)
    positional = [f for f in fields if "=" not in f]
    return int(named.get("port") or positional[0])


def _forward_ports(config: GatewayConfig) -> set[tuple[str, int]]:
    return {
        (protocol, forward.port) for forward in config.forwards for protocol in forward.protocols
    }


def _container_port(container: dict[str, Any], port: int | str) -> dict[str, Any]:
    """A container port by name or number, as a probe or a targetPort names it."""
    key = "name" if isinstance(port, str) else "containerPort"
    [found] = [p for p in container["ports"] if p[key] == port]
    return found


class Containerfile:
    """The instructions of the Containerfile, continuation lines joined."""

    def __init__(self, path: Path) -> None:
        self.instructions: list[tuple[str, str]] = []
        logical = ""
        for line in path.read_text().splitlines():
            if line.lstrip().startswith("#") or not line.strip():
                continue
            logical += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                keyword, _, rest = logical.strip().partition(" ")
                self.instructions.append((keyword.upper(), rest.strip()))
                logical = ""

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]

    def exec_form(self, keyword: str) -> list[str]:
        """The last C{keyword} (as the builder uses it), which must be a JSON array."""
        value = json.loads(self.all(keyword)[-1])
        assert isinstance(value, list), f"{keyword} is not in exec form"
        return [str(v) for v in value]

    @property
    def exposed(self) -> set[tuple[str, int]]:
        ports = set()
        for rest in self.all("EXPOSE"):
            for item in rest.split():
                port, _, protocol = item.partition("/")
                ports.add((protocol or "tcp", int(port)))
        return ports

    @property
    def user(self) -> str:
        return self.all("USER")[-1].split(":")[0]


@pytest.fixture(scope="module")
def containerfile() -> Containerfile:
    return Containerfile(CONTAINERFILE)


def test_every_manifest_loads_and_the_kustomization_lists_them_all(manifests: Manifests) -> None:
    kinds = sorted(d["kind"] for d in manifests.documents)
    assert kinds == [
        "ConfigMap", "Deployment", "Kustomization", "PodDisruptionBudget", "Service"
    ]  # fmt: skip
    for document in manifests.documents:
        assert document["apiVersion"], document["kind"]
        if document["kind"] != "Kustomization":
            assert document["metadata"]["name"], document["kind"]
    listed = sorted(manifests.one("Kustomization")["resources"])
    assert listed == [name for name in manifests.files if name != "kustomization.yaml"]


def test_the_config_path_is_a_key_of_the_mounted_configmap(
    manifests: Manifests, containerfile: Containerfile
) -> None:
    path = _option(manifests.args, "config")
    directory, key = posixpath.split(path)
    # A directory mount (no subPath): only so does the kubelet update the
    # file when the ConfigMap changes, which --watch relies on.
    [mount] = [m for m in manifests.container["volumeMounts"] if m["mountPath"] == directory]
    assert "subPath" not in mount
    [volume] = [v for v in manifests.pod["spec"]["volumes"] if v["name"] == mount["name"]]
    configmap = manifests.one("ConfigMap")
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]
    assert "items" not in volume["configMap"]  # each key is a file of its name
    assert key in configmap["data"]
    # The image's default is the same path.
    assert _option(containerfile.exec_form("CMD"), "config") == path
    # Live config: the pods re-read the file when the ConfigMap changes.
    assert "--watch" in manifests.args


def test_the_configmap_config_loads_and_listens_on_every_address(config: GatewayConfig) -> None:
    assert config.forwards
    # A forward on a particular address (127.0.0.1, say) would not be
    # reachable on the pod's address, where the Service sends traffic.
    assert [f.address for f in config.forwards] == [""] * len(config.forwards)


def test_the_forwards_ports_are_the_container_ports_and_the_service_ports(
    manifests: Manifests, config: GatewayConfig
) -> None:
    forwards = _forward_ports(config)
    metrics = _endpoint_port(_option(manifests.args, "metrics"))
    container = manifests.container
    container_ports = {
        (p["protocol"].lower(), p["containerPort"])
        for p in container["ports"]
        if p["containerPort"] != metrics
    }
    assert container_ports == forwards
    service = manifests.one("Service")["spec"]
    assert {(p["protocol"].lower(), p["port"]) for p in service["ports"]} == forwards
    for port in service["ports"]:
        target = _container_port(container, port["targetPort"])
        assert (target["protocol"], target["containerPort"]) == (port["protocol"], port["port"])
    assert service["type"] == "LoadBalancer"
    assert service["externalTrafficPolicy"] == "Local"


def test_the_probes_ask_the_health_pages_on_the_metrics_port(manifests: Manifests) -> None:
    container = manifests.container
    metrics = _endpoint_port(_option(manifests.args, "metrics"))
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        port = _container_port(container, get["port"])
        assert (port["containerPort"], port["protocol"]) == (metrics, "TCP"), probe
    annotations = manifests.pod["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == metrics
    # The metrics stay inside the cluster: not a port of the load balancer.
    service_ports = manifests.one("Service")["spec"]["ports"]
    assert metrics not in [p["port"] for p in service_ports]


def test_the_grace_period_outlasts_the_prestop_pause_and_the_drain(
    manifests: Manifests,
) -> None:
    drain = float(_option(manifests.args, "drain"))
    command = manifests.container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pause = float(command[1])
    grace = manifests.pod["spec"]["terminationGracePeriodSeconds"]
    assert drain > 0
    assert grace > pause + drain, (grace, pause, drain)


def test_the_selectors_pick_the_deployments_pods(manifests: Manifests) -> None:
    labels = manifests.pod["metadata"]["labels"]
    deployment = manifests.one("Deployment")["spec"]
    pdb = manifests.one("PodDisruptionBudget")["spec"]
    service = manifests.one("Service")["spec"]
    for name, selector in (
        ("Deployment", deployment["selector"]["matchLabels"]),
        ("PodDisruptionBudget", pdb["selector"]["matchLabels"]),
        ("Service", service["selector"]),
    ):
        assert selector, name
        assert selector.items() <= labels.items(), name
    # Two replicas or more, and a budget that still lets a node drain.
    assert deployment["replicas"] >= 2
    assert 1 <= pdb["minAvailable"] < deployment["replicas"]


def test_the_pod_runs_as_the_images_user_with_net_bind_service_alone(
    manifests: Manifests, containerfile: Containerfile, config: GatewayConfig
) -> None:
    pod = manifests.pod["spec"]["securityContext"]
    assert pod["runAsNonRoot"] is True
    assert str(pod["runAsUser"]) == containerfile.user != "0"
    security = manifests.container["securityContext"]
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert security["capabilities"]["drop"] == ["ALL"]
    privileged = any(f.port < 1024 for f in config.forwards)
    assert security["capabilities"].get("add", []) == (["NET_BIND_SERVICE"] if privileged else [])
    # The image's entry point runs the interpreter that holds the capability.
    interpreter = containerfile.exec_form("ENTRYPOINT")[0]
    [setcap] = [run for run in containerfile.all("RUN") if "setcap" in run]
    assert f"setcap cap_net_bind_service=+ep {interpreter}" in setcap


def test_the_entrypoint_runs_goma_pt_in_the_foreground_without_a_pidfile(
    containerfile: Containerfile,
) -> None:
    entrypoint = containerfile.exec_form("ENTRYPOINT")
    assert entrypoint[1].endswith("/twistd")
    assert entrypoint[-1] == "goma-pt"
    twistd_options = entrypoint[2:-1]
    assert "--nodaemon" in twistd_options or "-n" in twistd_options
    assert "--pidfile=" in twistd_options


def test_the_containerfile_exposes_the_forwards_and_the_metrics_port(
    manifests: Manifests, containerfile: Containerfile, config: GatewayConfig
) -> None:
    metrics = _endpoint_port(_option(containerfile.exec_form("CMD"), "metrics"))
    assert metrics == _endpoint_port(_option(manifests.args, "metrics"))
    assert containerfile.exposed == _forward_ports(config) | {("tcp", metrics)}


@pytest.mark.parametrize("where", ["Deployment", "Containerfile"])
def test_the_options_pass_goma_pts_own_parser(
    where: str,
    manifests: Manifests,
    containerfile: Containerfile,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = manifests.args if where == "Deployment" else containerfile.exec_form("CMD")
    config = tmp_path / "goma.yml"
    config.write_text(_config_text(manifests))
    args = [str(config) if arg == _option(args, "config") else arg for arg in args]
    options: list[Any] = [*Options.optParameters, *Options.optFlags]
    known = {f"--{option[0]}" for option in options}
    if "--watch" in args and "--watch" not in known:
        # Live config (--watch) comes with its own change; until then the
        # Deployment names it ahead, and only it.
        assert where == "Deployment"
        args.remove("--watch")
    with pytest.raises(SystemExit) as exited:
        Options().parseOptions([*args, "--check"])
    assert exited.value.code == 0, capsys.readouterr().out
