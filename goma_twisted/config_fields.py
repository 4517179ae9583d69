"""
The checks of one forward's fields, each on its YAML node: the value's type
and range, with the line and column of what the file gave and a sentence
saying what is accepted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import yaml
from twisted.internet.abstract import isIPAddress, isIPv6Address

from .config_values import DEFAULT_KEEPALIVE, PROTOCOLS, Problem, Target, parse_target
from .config_yaml import Entries, describe, is_null
from .policy import IPNetwork, parse_network

# Bound on each address list, so a pasted list cannot slow every accept.
MAX_LIST_ENTRIES = 10_000
# Linux takes TCP_KEEPIDLE and TCP_KEEPINTVL up to this many seconds.
MAX_KEEPALIVE = 32767


class FieldChecks:
    """
    Reads values off composed YAML nodes (which keep their marks) and
    collects a L{Problem} for each one that is not what its key accepts.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []
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
    ) -> Entries | None:
        """
        A mapping's entries by key, or None after recording why not.
        """
        if node is None or is_null(node):
            if required:
                self.problem(node, path, "missing; expected a mapping")
            return None
        if not isinstance(node, yaml.MappingNode):
            self.problem(node, path, f"expected a mapping, got {describe(node)}")
            return None
        entries: Entries = {}
        for key_node, value_node in node.value:
            key = self.scalar(key_node)
            if not isinstance(key, str):
                self.problem(key_node, path, f"keys must be strings, got {describe(key_node)}")
                continue
            if key in entries:
                self.problem(key_node, join(path, key), "given twice")
                continue
            entries[key] = (key_node, value_node)
        return entries

    def protocol(self, entries: Entries, node: yaml.Node, path: str) -> tuple[str, ...] | None:
        accepted = "tcp, udp or tcp/udp"
        if "protocol" not in entries:
            self.problem(node, join(path, "protocol"), f"missing; expected {accepted}")
            return None
        value_node = entries["protocol"][1]
        value = self.scalar(value_node)
        if isinstance(value, str) and value.strip().lower() in PROTOCOLS:
            return PROTOCOLS[value.strip().lower()]
        self.problem(
            value_node,
            join(path, "protocol"),
            f"got {describe(value_node)}; expected {accepted}",
        )
        return None

    def port(
        self, entry: tuple[yaml.Node, yaml.Node] | None, node: yaml.Node, path: str
    ) -> int | None:
        where = join(path, "port")
        if entry is None:
            self.problem(node, where, "missing; expected the listening port, 1 to 65535")
            return None
        value_node = entry[1]
        value = self.scalar(value_node)
        if type(value) is not int or not 1 <= value <= 65535:
            self.problem(value_node, where, f"got {describe(value_node)}; expected 1 to 65535")
            return None
        return value

    def target(
        self, entry: tuple[yaml.Node, yaml.Node] | None, node: yaml.Node, path: str
    ) -> Target | None:
        where = join(path, "target")
        accepted = "expected host:port, ip:port or [ipv6]:port"
        if entry is None:
            self.problem(node, where, f"missing; {accepted}")
            return None
        value_node = entry[1]
        value = self.scalar(value_node)
        if not isinstance(value, str):
            self.problem(value_node, where, f"got {describe(value_node)}; {accepted}")
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
            join(path, "address"),
            f"got {describe(value_node)}; expected an IP address to listen on "
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
        where = join(path, str(key_node.value))
        self.problem(value_node, where, f"got {describe(value_node)}; {expected}")
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
        where = join(path, str(key_node.value))
        accepted = "expected a list of IP addresses or CIDR blocks: [10.0.0.0/8, 2001:db8::/32]"
        items: list[yaml.Node]
        if isinstance(value_node, yaml.SequenceNode):
            items = list(value_node.value)
        elif isinstance(value_node, yaml.ScalarNode) and isinstance(self.scalar(value_node), str):
            items = [value_node]
        else:
            self.problem(value_node, where, f"got {describe(value_node)}; {accepted}")
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
                self.problem(item, item_where, f"got {describe(item)}; {accepted}")
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

    def backlog(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> int | None:
        return self.optional(
            entry,
            path,
            lambda v: type(v) is int and 1 <= v <= 65535,
            "expected a listen backlog, 1 to 65535 (without the key: the system's "
            "net.core.somaxconn)",
        )

    def keepalive(self, entry: tuple[yaml.Node, yaml.Node] | None, path: str) -> float | None:
        """
        Seconds of idle before the first probe and between probes, True for
        the default, False (C{off}, C{no}) for none. 0 is refused: Go reads
        a zero KeepAlive as its default, an operator may read it as off.
        """
        if entry is None:
            return DEFAULT_KEEPALIVE
        key_node, value_node = entry
        value = self.scalar(value_node)
        if value is True:
            return DEFAULT_KEEPALIVE
        if value is False:
            return None
        if type(value) is int and 1 <= value <= MAX_KEEPALIVE:
            return float(value)
        if type(value) in (int, float) and value == 0:
            expected = "to switch keepalive off, write false (0 is Go's default, 15 s)"
        else:
            expected = (
                f"expected a whole number of seconds, 1 to {MAX_KEEPALIVE}, or false "
                "to switch keepalive off"
            )
        self.problem(
            value_node, join(path, str(key_node.value)), f"got {describe(value_node)}; {expected}"
        )
        return None


def join(path: str, key: str) -> str:
    """The path of C{key} under C{path}, as errors name it: C{forwards[0].port}."""
    return f"{path}.{key}" if path else key


def _is_seconds(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value) and value > 0
