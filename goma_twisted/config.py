"""
Read a Goma Gateway config file into frozen values that goma-pt acts on.

Only C{gateway.entryPoints.passThrough} is acted on and checked strictly;
the rest of a Goma config (routes, middlewares, other entry points) is
accepted as it is, so that goma-pt can read the very file Goma reads.

Every problem found is collected, with its file, line and column, so an
operator fixes a file in one pass instead of one error per restart.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml
from attrs import frozen
from twisted.internet.abstract import isIPAddress, isIPv6Address

from .policy import AddressPolicy, IPNetwork, parse_network

# Goma Gateway's own defaults when a forward gives no timeout.
DEFAULT_CONNECT_TIMEOUT = 10.0
DEFAULT_UDP_IDLE_TIMEOUT = 300.0

# A config is a few kilobytes; these bounds keep a hostile or mistaken
# file (a log, a core dump, an alias bomb) from costing time or memory.
MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 64

PROTOCOLS = {"tcp": ("tcp",), "udp": ("udp",), "tcp/udp": ("tcp", "udp")}
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
)
# Keys that act on one protocol only; giving one to a forward without
# that protocol is an error, as it would silently do nothing.
TCP_ONLY_KEYS = ("maxConnections", "maxConnectionsPerIp", "proxyProtocol", "acceptProxyProtocol")
UDP_ONLY_KEYS = ("maxSessions", "maxSessionsPerIp", "udpResponses")
# Bound on each address list, so a pasted list cannot slow every accept.
MAX_LIST_ENTRIES = 10_000
PASSTHROUGH_KEYS = ("forwards",)

_HOSTNAME_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")


@frozen
class Problem:
    """One thing wrong with a config file, and where it is."""

    source: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}:{self.column}" if self.line else self.source
        return f"{where}: {self.path}: {self.message}" if self.path else f"{where}: {self.message}"


class ConfigError(Exception):
    """
    A config file cannot be used; C{problems} lists every reason at once.
    """

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = tuple(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return str(self.problems[0])
        lines = [f"{len(self.problems)} problems in {self.problems[0].source}:"]
        lines += [f"  {problem}" for problem in self.problems]
        return "\n".join(lines)


@frozen
class Target:
    """Where a forward sends traffic: an IP literal or a hostname, and a port."""

    host: str
    port: int

    @property
    def is_hostname(self) -> bool:
        """A hostname is resolved per connection or session, never once."""
        return not (isIPAddress(self.host) or isIPv6Address(self.host))

    def __str__(self) -> str:
        return format_address(self.host, self.port)


@frozen
class Forward:
    """
    One entry of C{passThrough.forwards}, with every default resolved.

    C{idle_timeout} is None when TCP connections may stay idle forever
    (TCP keepalive still finds dead peers).
    """

    protocols: tuple[str, ...]
    port: int
    target: Target
    address: str = ""
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT
    idle_timeout: float | None = None
    udp_idle_timeout: float = DEFAULT_UDP_IDLE_TIMEOUT
    max_sessions: int | None = None
    allow: tuple[IPNetwork, ...] = ()
    deny: tuple[IPNetwork, ...] = ()
    max_connections: int | None = None
    max_connections_per_ip: int | None = None
    max_sessions_per_ip: int | None = None
    proxy_protocol: int | None = None
    accept_proxy_protocol: tuple[IPNetwork, ...] = ()
    udp_responses: int | None = None
    reuse_port: bool = False

    @property
    def policy(self) -> AddressPolicy:
        """Who may use this forward: its C{allow} and C{deny} lists."""
        return AddressPolicy(self.allow, self.deny)

    @property
    def protocol(self) -> str:
        return "/".join(self.protocols)

    @property
    def name(self) -> str:
        """How logs and errors name this forward: C{tcp/udp 53}."""
        if self.address:
            return f"{self.protocol} {format_address(self.address, self.port)}"
        return f"{self.protocol} {self.port}"


@frozen
class GatewayConfig:
    """What goma-pt acts on, and what it read but leaves to Goma Gateway."""

    source: str
    forwards: tuple[Forward, ...]
    ignored: tuple[str, ...] = ()


def format_address(host: str, port: int) -> str:
    """
    C{host:port}, with IPv6 literals in brackets and IPv4 clients of a
    dual-stack listener (C{::ffff:192.0.2.1}) shown as the IPv4 they are.
    """
    if host.startswith("::ffff:") and isIPAddress(host[7:]):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def load_config(path: str | Path) -> GatewayConfig:
    """
    Read and check the config file at C{path}.

    @raise ConfigError: for a file that cannot be read or used.
    """
    source = str(path)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise ConfigError(
            [Problem(source, 0, 0, "", f"cannot read the file: {e.strerror}")]
        ) from e
    return parse_config(data, source)


def parse_config(data: bytes | str, source: str = "<config>") -> GatewayConfig:
    """
    Check a config document given as bytes (UTF-8) or text.

    @raise ConfigError: listing every problem found.
    """
    text = _decode(data, source)
    node = _compose(text, source)
    checker = _Checker(source)
    config = checker.gateway(node)
    if checker.problems or config is None:
        raise ConfigError(sorted(checker.problems, key=lambda p: (p.line, p.column)))
    return config


def _decode(data: bytes | str, source: str) -> str:
    if len(data) > MAX_FILE_BYTES:
        message = f"the file is larger than {MAX_FILE_BYTES // (1024 * 1024)} MiB; is it a config?"
        raise ConfigError([Problem(source, 1, 1, "", message)])
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        message = f"byte 0x{data[e.start]:02x} is not UTF-8; save the file as UTF-8"
        raise ConfigError([Problem(source, line, column, "", message)]) from None


def _compose(text: str, source: str) -> yaml.Node | None:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        _check_depth(text, loader, source)
        return yaml.compose(text, Loader=loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        message = f"not valid YAML: {e.problem or e.context}"
        raise ConfigError([Problem(source, line, column, "", message)]) from None
    except yaml.YAMLError as e:
        raise ConfigError([Problem(source, 1, 1, "", f"not valid YAML: {e}")]) from None


def _check_depth(text: str, loader: type, source: str) -> None:
    """
    Refuse deep nesting before composing: the composer recurses once per
    level, and a few thousand brackets would crash the interpreter.
    """
    depth = 0
    for event in yaml.parse(text, Loader=loader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            if depth > MAX_DEPTH:
                mark: Any = event.start_mark
                message = f"nested more than {MAX_DEPTH} levels deep"
                raise ConfigError([Problem(source, mark.line + 1, mark.column + 1, "", message)])
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1


_YAML_TYPE_NAMES = {
    "tag:yaml.org,2002:int": "an integer",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:bool": "a boolean",
    "tag:yaml.org,2002:null": "empty",
    "tag:yaml.org,2002:str": "a string",
}


def _describe(node: yaml.Node) -> str:
    """How an error message names what the file gave."""
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    kind = _YAML_TYPE_NAMES.get(node.tag, "a value")
    if node.tag == "tag:yaml.org,2002:null":
        return kind
    return f"{kind} ({node.value!r})"


class _Checker:
    """
    Walks the composed YAML nodes (which keep their marks) and collects
    problems, so every error names the line it comes from.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
        self.ignored: list[str] = []
        self._constructor = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node | None, path: str, message: str) -> None:
        line, column = (node.start_mark.line + 1, node.start_mark.column + 1) if node else (1, 1)
        self.problems.append(Problem(self.source, line, column, path, message))

    def scalar(self, node: yaml.Node) -> object:
        """The Python value of a scalar node, as YAML 1.1 types it."""
        if not isinstance(node, yaml.ScalarNode):
            return node
        try:
            return self._constructor.construct_object(node)
        except (yaml.YAMLError, ValueError, TypeError, OverflowError):
            return node.value

    def mapping(
        self, node: yaml.Node | None, path: str, *, required: bool = True
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """
        A mapping's entries by key, or None after recording why not.
        """
        if node is None or (
            isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"
        ):
            if required:
                self.problem(node, path, "missing; expected a mapping")
            return None
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, f"expected a mapping, got {_describe(node)}")
            return None
        entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                self.problem(key_node, path, f"keys must be strings, got {_describe(key_node)}")
                continue
            if key in entries:
                self.problem(key_node, _join(path, key), "given twice")
                continue
            entries[key] = (key_node, value_node)
        return entries

    def gateway(self, root: yaml.Node | None) -> GatewayConfig | None:
        if root is None:
            self.problem(None, "", "the file is empty; expected a Goma Gateway config")
            return None
        if _count_nodes(root) > MAX_NODES:
            self.problem(root, "", f"the document has more than {MAX_NODES} values")
            return None
        top = self.mapping(root, "(top level)")
        if top is None:
            return None
        self.ignored += [key for key in top if key != "gateway"]
        gateway = self.mapping(_value(top, "gateway"), "gateway")
        if gateway is None:
            return None
        self.ignored += [f"gateway.{key}" for key in gateway if key != "entryPoints"]
        entry_points = self.mapping(_value(gateway, "entryPoints"), "gateway.entryPoints")
        if entry_points is None:
            return None
        self.ignored += [
            f"gateway.entryPoints.{key}" for key in entry_points if key != "passThrough"
        ]
        path = "gateway.entryPoints.passThrough"
        pass_through = self.mapping(_value(entry_points, "passThrough"), path)
        if pass_through is None:
            return None
        self.unknown_keys(pass_through, PASSTHROUGH_KEYS, path)
        forwards = self.forwards(_value(pass_through, "forwards"), pass_through)
        self.clashes(forwards)
        return GatewayConfig(self.source, tuple(f for f, _ in forwards), tuple(self.ignored))

    def unknown_keys(
        self, entries: dict[str, tuple[yaml.Node, yaml.Node]], known: tuple[str, ...], path: str
    ) -> None:
        for key, (key_node, _) in entries.items():
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            hint = f"did you mean `{close[0]}`?" if close else "known keys: " + ", ".join(known)
            self.problem(key_node, _join(path, key), f"unknown key; {hint}")

    def forwards(
        self, node: yaml.Node | None, parent: dict[str, tuple[yaml.Node, yaml.Node]]
    ) -> list[tuple[Forward, yaml.Node]]:
        path = "forwards"
        if node is None:
            anchor = next(iter(parent.values()))[0] if parent else None
            self.problem(anchor, path, "missing; list at least one forward")
            return []
        if not isinstance(node, yaml.SequenceNode):
            self.problem(node, path, f"expected a list of forwards, got {_describe(node)}")
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
        )

    def protocol(
        self, entries: dict[str, tuple[yaml.Node, yaml.Node]], node: yaml.Node, path: str
    ) -> tuple[str, ...] | None:
        accepted = "tcp, udp or tcp/udp"
        if "protocol" not in entries:
            self.problem(node, _join(path, "protocol"), f"missing; expected {accepted}")
            return None
        value_node = entries["protocol"][1]
        value = self.scalar(value_node)
        if isinstance(value, str) and value.strip().lower() in PROTOCOLS:
            return PROTOCOLS[value.strip().lower()]
        self.problem(
            value_node,
            _join(path, "protocol"),
            f"got {_describe(value_node)}; expected {accepted}",
        )
        return None

    def port(
        self, entry: tuple[yaml.Node, yaml.Node] | None, node: yaml.Node, path: str
    ) -> int | None:
        where = _join(path, "port")
        if entry is None:
            self.problem(node, where, "missing; expected the listening port, 1 to 65535")
            return None
        value_node = entry[1]
        value = self.scalar(value_node)
        if type(value) is not int or not 1 <= value <= 65535:
            self.problem(value_node, where, f"got {_describe(value_node)}; expected 1 to 65535")
            return None
        return value

    def target(
        self, entry: tuple[yaml.Node, yaml.Node] | None, node: yaml.Node, path: str
    ) -> Target | None:
        where = _join(path, "target")
        accepted = "expected host:port, ip:port or [ipv6]:port"
        if entry is None:
            self.problem(node, where, f"missing; {accepted}")
            return None
        value_node = entry[1]
        value = self.scalar(value_node)
        if not isinstance(value, str):
            self.problem(value_node, where, f"got {_describe(value_node)}; {accepted}")
            return None
        target, why = parse_target(value)
        if target is None:
            self.problem(value_node, where, f"{why} in {value!r}; {accepted}")
        return target

    def address(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> str:
        if entry is None:
            return ""
        value_node = entry[1]
        value = self.scalar(value_node)
        if value is None or value == "":
            return ""
        if isinstance(value, str):
            host = value[1:-1] if value.startswith("[") and value.endswith("]") else value
            if isIPAddress(host) or isIPv6Address(host):
                return host
        self.problem(
            value_node,
            _join(path, "address"),
            f"got {_describe(value_node)}; expected an IP address to listen on "
            "(0.0.0.0, ::, 127.0.0.1, ::1, ...)",
        )
        return ""

    def optional(
        self,
        entry: tuple[yaml.Node, yaml.Node] | None,
        path: str,
        accepts: Callable[[Any], bool],
        expected: str,
    ) -> Any:
        """
        The value of an optional scalar key, or None when it is absent or
        not what C{accepts} takes (then recorded, with C{expected}).
        """
        if entry is None:
            return None
        key_node, value_node = entry
        value = self.scalar(value_node)
        if accepts(value):
            return value
        where = _join(path, str(key_node.value))
        self.problem(value_node, where, f"got {_describe(value_node)}; {expected}")
        return None

    def seconds(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> float | None:
        value = self.optional(
            entry, path, _is_seconds, "expected a number of seconds greater than 0"
        )
        return None if value is None else float(value)

    def positive_int(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> int | None:
        return self.optional(
            entry,
            path,
            lambda v: type(v) is int and v >= 1,
            "expected a whole number of at least 1",
        )

    def boolean(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> bool:
        return bool(
            self.optional(entry, path, lambda v: type(v) is bool, "expected true or false")
        )

    def networks(
        self, entry: tuple[yaml.Node, yaml.Node] | None, path: str
    ) -> tuple[IPNetwork, ...]:
        """A list of addresses and CIDR blocks (one string alone is a list of one)."""
        if entry is None:
            return ()
        key_node, value_node = entry
        where = _join(path, str(key_node.value))
        accepted = "expected a list of IP addresses or CIDR blocks: [10.0.0.0/8, 2001:db8::/32]"
        items: list[yaml.Node]
        if isinstance(value_node, yaml.SequenceNode):
            items = list(value_node.value)
        elif isinstance(value_node, yaml.ScalarNode) and isinstance(self.scalar(value_node), str):
            items = [value_node]
        else:
            self.problem(value_node, where, f"got {_describe(value_node)}; {accepted}")
            return ()
        if not items:
            self.problem(value_node, where, f"the list is empty; {accepted}")
            return ()
        if len(items) > MAX_LIST_ENTRIES:
            self.problem(value_node, where, f"more than {MAX_LIST_ENTRIES} entries")
            return ()
        result = []
        for index, item in enumerate(items):
            value = self.scalar(item)
            item_where = where if item is value_node else f"{where}[{index}]"
            if not isinstance(value, str):
                self.problem(item, item_where, f"got {_describe(item)}; {accepted}")
                continue
            network, why = parse_network(value)
            if network is None:
                self.problem(item, item_where, why)
                continue
            result.append(network)
        return tuple(result)

    def proxy_version(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> int | None:
        return self.optional(
            entry,
            path,
            lambda v: type(v) is int and v in (1, 2),
            "expected 1 (text header) or 2 (binary header)",
        )

    def protocol_keys(
        self,
        entries: dict[str, tuple[yaml.Node, yaml.Node]],
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
                        _join(path, key),
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


def parse_target(text: str) -> tuple[Target | None, str]:
    """
    Split C{host:port}, C{ip:port} or C{[ipv6]:port}; on failure say why.
    """
    text = text.strip()
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or not rest.startswith(":"):
            return None, "an IPv6 target needs the form [address]:port"
        if not isIPv6Address(host):
            return None, f"{host!r} is not an IPv6 address"
        port_text = rest[1:]
    else:
        host, colon, port_text = text.rpartition(":")
        if not colon:
            return None, "no port"
        if ":" in host:
            return None, "an IPv6 address must be in brackets"
        if not host:
            return None, "no host"
        if not (isIPAddress(host) or _is_hostname(host)):
            return None, f"{host!r} is not a hostname or an IP address"
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        return None, f"port {port_text!r} is not 1 to 65535"
    return Target(host, int(port_text)), ""


def _is_seconds(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0


def _is_hostname(host: str) -> bool:
    if len(host) > 253 or host.replace(".", "").isdigit():
        return False
    return all(_HOSTNAME_LABEL.match(label) for label in host.rstrip(".").split("."))


def _addresses_overlap(a: str, b: str) -> bool:
    wildcards = ("", "0.0.0.0", "::")
    return a == b or a in wildcards or b in wildcards


def _value(entries: dict[str, tuple[yaml.Node, yaml.Node]], key: str) -> yaml.Node | None:
    entry = entries.get(key)
    return entry[1] if entry else None


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _count_nodes(root: yaml.Node) -> int:
    """Nodes reachable from C{root}, counting each alias use again (the bomb's cost)."""
    count = 0
    stack: list[yaml.Node] = [root]
    while stack and count <= MAX_NODES:
        node = stack.pop()
        count += 1
        stack.extend(_children(node))
    return count


def _children(node: yaml.Node) -> Iterator[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        yield from node.value
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            yield key
            yield value
