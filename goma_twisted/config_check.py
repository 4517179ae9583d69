"""
The checks of a config's composed YAML nodes: C{gateway.entryPoints.passThrough}
strictly (every field's type and range, unknown keys with the nearest known
one, clashing forwards), the rest of a Goma config only as far as the path to
it. Every problem is collected with its line and column, so an operator fixes
a file in one pass.
"""

from __future__ import annotations

import difflib

import yaml

from .config_fields import FieldChecks, join
from .config_values import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_UDP_IDLE_TIMEOUT,
    ConfigError,
    Forward,
    GatewayConfig,
)
from .config_yaml import MAX_NODES, Entries, count_nodes, describe, value_of

FORWARD_KEYS = (
    "protocol",
    "port",
    "target",
    "timeout",
    "address",
    "connectTimeout",
    "idleTimeout",
    "maxSessions",
    "allow",
    "deny",
    "maxConnections",
    "maxConnectionsPerIp",
    "maxSessionsPerIp",
    "proxyProtocol",
    "acceptProxyProtocol",
    "udpResponses",
    "reusePort",
    "keepalive",
    "backlog",
)
# Keys that act on one protocol only; giving one to a forward without
# that protocol is an error, as it would silently do nothing.
TCP_ONLY_KEYS = (
    "maxConnections",
    "maxConnectionsPerIp",
    "proxyProtocol",
    "acceptProxyProtocol",
    "keepalive",
    "backlog",
)
UDP_ONLY_KEYS = ("maxSessions", "maxSessionsPerIp", "udpResponses")
PASSTHROUGH_KEYS = ("forwards",)


def check(root: yaml.Node | None, source: str) -> GatewayConfig:
    """
    The config the nodes under C{root} describe.

    @raise ConfigError: listing every problem found, in the file's order.
    """
    checker = _Checker(source)
    config = checker.gateway(root)
    if checker.problems or config is None:
        raise ConfigError(sorted(checker.problems, key=lambda p: (p.line, p.column)))
    return config


class _Checker(FieldChecks):
    """
    Walks a Goma config's nodes down to C{passThrough}, checks every
    forward, and notes the parts it does not act on.
    """

    def __init__(self, source: str) -> None:
        super().__init__(source)
        self.ignored: list[str] = []

    def gateway(self, root: yaml.Node | None) -> GatewayConfig | None:
        if root is None:
            self.problem(None, "", "the file is empty; expected a Goma Gateway config")
            return None
        if count_nodes(root) > MAX_NODES:
            self.problem(root, "", f"the document has more than {MAX_NODES} values")
            return None
        top = self.mapping(root, "(top level)")
        if top is None:
            return None
        self.ignored += [key for key in top if key != "gateway"]
        gateway = self.mapping(value_of(top, "gateway"), "gateway")
        if gateway is None:
            return None
        self.ignored += [f"gateway.{key}" for key in gateway if key != "entryPoints"]
        entry_points = self.mapping(value_of(gateway, "entryPoints"), "gateway.entryPoints")
        if entry_points is None:
            return None
        self.ignored += [
            f"gateway.entryPoints.{key}" for key in entry_points if key != "passThrough"
        ]
        path = "gateway.entryPoints.passThrough"
        pass_through = self.mapping(value_of(entry_points, "passThrough"), path)
        if pass_through is None:
            return None
        self.unknown_keys(pass_through, PASSTHROUGH_KEYS, path)
        forwards = self.forwards(value_of(pass_through, "forwards"), pass_through)
        self.clashes(forwards)
        return GatewayConfig(self.source, tuple(f for f, _ in forwards), tuple(self.ignored))

    def unknown_keys(self, entries: Entries, known: tuple[str, ...], path: str) -> None:
        for key, (key_node, _) in entries.items():
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else "known keys: " + ", ".join(known)
            self.problem(key_node, join(path, key), f"unknown key; {hint}")

    def forwards(self, node: yaml.Node | None, parent: Entries) -> list[tuple[Forward, yaml.Node]]:
        path = "forwards"
        if node is None:
            anchor = next(iter(parent.values()))[0] if parent else None
            self.problem(anchor, path, "missing; list at least one forward")
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, path, f"expected a list of forwards, got {describe(node)}")
            return []
        if not node.value:
            self.problem(node, path, "the list is empty; goma-pt would forward nothing")
            return []
        result = []
        for index, item in enumerate(node.value):
            forward = self.forward(item, f"forwards[{index}]")
            if forward is not None:
                result.append((forward, item))
        return result

    def forward(self, node: yaml.Node, path: str) -> Forward | None:
        entries = self.mapping(node, path)
        if entries is None:
            return None
        before = len(self.problems)
        self.unknown_keys(entries, FORWARD_KEYS, path)
        protocols = self.protocol(entries, node, path)
        port = self.port(entries.get("port"), node, path)
        target = self.target(entries.get("target"), node, path)
        address = self.address(entries.get("address"), path)
        timeout = self.seconds(entries.get("timeout"), path)
        connect_timeout = self.seconds(entries.get("connectTimeout"), path)
        idle_timeout = self.seconds(entries.get("idleTimeout"), path)
        max_sessions = self.positive_int(entries.get("maxSessions"), path)
        allow = self.networks(entries.get("allow"), path)
        deny = self.networks(entries.get("deny"), path)
        max_connections = self.positive_int(entries.get("maxConnections"), path)
        per_ip = self.positive_int(entries.get("maxConnectionsPerIp"), path)
        sessions_per_ip = self.positive_int(entries.get("maxSessionsPerIp"), path)
        proxy_protocol = self.proxy_version(entries.get("proxyProtocol"), path)
        accept_proxy = self.networks(entries.get("acceptProxyProtocol"), path)
        udp_responses = self.positive_int(entries.get("udpResponses"), path)
        reuse_port = self.boolean(entries.get("reusePort"), path)
        keepalive = self.keepalive(entries.get("keepalive"), path)
        backlog = self.backlog(entries.get("backlog"), path)
        if protocols is not None:
            self.protocol_keys(entries, protocols, path)
        if len(self.problems) > before or protocols is None or port is None or target is None:
            return None
        tcp_idle = idle_timeout if idle_timeout is not None else timeout
        udp_idle = idle_timeout or timeout or DEFAULT_UDP_IDLE_TIMEOUT
        return Forward(
            protocols=protocols,
            port=port,
            target=target,
            address=address,
            connect_timeout=connect_timeout or timeout or DEFAULT_CONNECT_TIMEOUT,
            idle_timeout=tcp_idle,
            udp_idle_timeout=udp_idle,
            max_sessions=max_sessions,
            allow=allow,
            deny=deny,
            max_connections=max_connections,
            max_connections_per_ip=per_ip,
            max_sessions_per_ip=sessions_per_ip,
            proxy_protocol=proxy_protocol,
            accept_proxy_protocol=accept_proxy,
            udp_responses=udp_responses,
            reuse_port=reuse_port,
            keepalive=keepalive,
            backlog=backlog,
        )

    def protocol_keys(
        self,
        entries: Entries,
        protocols: tuple[str, ...],
        path: str,
    ) -> None:
        """A TCP-only key on a UDP forward (or the reverse) would do nothing: say so."""
        for keys, needed in ((TCP_ONLY_KEYS, "tcp"), (UDP_ONLY_KEYS, "udp")):
            if needed in protocols:
                continue
            for key in keys:
                if key in entries:
                    self.problem(
                        entries[key][0],
                        join(path, key),
                        f"applies to {needed} forwards only; this forward is "
                        f"{'/'.join(protocols)} (use protocol: tcp/udp for both)",
                    )

    def clashes(self, forwards: list[tuple[Forward, yaml.Node]]) -> None:
        """Two forwards cannot listen on the same port for the same protocol."""
        seen: dict[tuple[str, int], list[tuple[int, Forward]]] = {}
        for index, (forward, node) in enumerate(forwards):
            for protocol in forward.protocols:
                for other_index, other in seen.get((protocol, forward.port), []):
                    if _addresses_overlap(forward.address, other.address):
                        self.problem(
                            node,
                            f"forwards[{index}]",
                            f"{protocol} port {forward.port} is already forwarded by "
                            f"forwards[{other_index}] ({other.name} -> {other.target})",
                        )
                seen.setdefault((protocol, forward.port), []).append((index, forward))


def _addresses_overlap(a: str, b: str) -> bool:
    wildcards = ("", "0.0.0.0", "::")
    return a == b or a in wildcards or b in wildcards
