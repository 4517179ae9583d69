"""
The config loader, without sockets: Goma Gateway's examples, defaults,
and errors that name the line and the field.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from pathlib import Path

import pytest
import yaml

from goma_twisted.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEEPALIVE,
    DEFAULT_UDP_IDLE_TIMEOUT,
    ConfigError,
    Forward,
    Problem,
    Target,
    format_address,
    load_config,
    parse_config,
    parse_target,
)
from goma_twisted.sockopts import keepalive_options

from .support import ROOT

# Goma Gateway's documentation examples, as its page gives them.
MINIMAL = """\
gateway:
  entryPoints:
    passThrough:
      forwards:
        - protocol: tcp
          port: 2222
          target: srv1.example.com:61557
"""

FULL = """\
version: 2
gateway:
  entryPoints:
    web:
      address: ":80"       # HTTP server port
    webSecure:
      address: ":443"      # HTTPS server port
    passThrough:
      forwards:
        - protocol: tcp
          port: 61557
          target: srv1.example.com:22
          timeout: 5
        - protocol: tcp/udp
          port: 53
          target: 10.25.10.15:53
        - protocol: udp
          port: 54
          target: 10.25.10.22:54
"""


def test_shipped_examples_are_goma_gatewayss_own() -> None:
    assert (ROOT / "etc" / "goma-minimal.yaml").read_text() == MINIMAL
    assert (ROOT / "etc" / "goma-full.yaml").read_text() == FULL


def test_minimal_example() -> None:
    config = load_config(ROOT / "etc" / "goma-minimal.yaml")
    assert config.forwards == (Forward(("tcp",), 2222, Target("srv1.example.com", 61557)),)
    [forward] = config.forwards
    assert forward.connect_timeout == DEFAULT_CONNECT_TIMEOUT == 10
    assert forward.idle_timeout is None
    assert forward.udp_idle_timeout == DEFAULT_UDP_IDLE_TIMEOUT == 300
    assert forward.address == ""
    assert config.ignored == ()


def test_full_example() -> None:
    config = load_config(ROOT / "etc" / "goma-full.yaml")
    ssh, dns, other = config.forwards
    assert (ssh.protocols, ssh.port, str(ssh.target)) == (("tcp",), 61557, "srv1.example.com:22")
    # Goma's `timeout`: TCP connect and idle timeout, UDP idle timeout.
    assert (ssh.connect_timeout, ssh.idle_timeout, ssh.udp_idle_timeout) == (5, 5, 5)
    assert (dns.protocols, dns.port, str(dns.target)) == (("tcp", "udp"), 53, "10.25.10.15:53")
    assert (other.protocols, other.port) == (("udp",), 54)
    assert config.ignored == (
        "version",
        "gateway.entryPoints.web",
        "gateway.entryPoints.webSecure",
    )


def test_the_example_config_in_etc_loads() -> None:
    config = load_config(ROOT / "etc" / "goma-pt.yaml")
    assert [f.name for f in config.forwards] == ["tcp 127.0.0.1:8080", "tcp/udp 127.0.0.1:5353"]


def test_a_full_goma_config_loads_and_only_passthrough_is_read() -> None:
    config = parse_config(
        """
version: 2
gateway:
  writeTimeout: 15
  readTimeout: 15
  entryPoints:
    web: {address: ":80"}
    passThrough:
      forwards:
        - {protocol: tcp, port: 2222, target: "[2001:db8::1]:22"}
  routes:
    - path: /
      name: example
      backends:
        - endpoint: https://example.com
      middlewares: [basic-auth]
middlewares:
  - name: basic-auth
    type: basic
    rule: {users: ["admin:admin"]}
certManager:
  acme: {email: admin@example.com}
"""
    )
    assert str(config.forwards[0].target) == "[2001:db8::1]:22"
    assert config.ignored == (
        "version",
        "middlewares",
        "certManager",
        "gateway.writeTimeout",
        "gateway.readTimeout",
        "gateway.routes",
        "gateway.entryPoints.web",
    )


def forwards(*items: str) -> str:
    body = "".join(f"        - {item}\n" for item in items)
    return f"gateway:\n  entryPoints:\n    passThrough:\n      forwards:\n{body}"


def test_extensions_override_the_parts_of_timeout() -> None:
    config = parse_config(
        forwards(
            "{protocol: tcp/udp, port: 1, target: 'a:1', timeout: 5, connectTimeout: 2}",
            "{protocol: tcp, port: 2, target: 'a:1', idleTimeout: 600}",
            "{protocol: udp, port: 3, target: 'a:1', idleTimeout: 0.5, maxSessions: 10, "
            "udpResponses: 1}",
            "{protocol: tcp, port: 4, target: 'a:1', address: '::1'}",
        )
    )
    a, b, c, d = config.forwards
    assert (a.connect_timeout, a.idle_timeout, a.udp_idle_timeout) == (2, 5, 5)
    assert (b.connect_timeout, b.idle_timeout, b.udp_idle_timeout) == (10, 600, 600)
    assert (c.udp_idle_timeout, c.max_sessions, c.udp_responses) == (0.5, 10, 1)
    assert d.address == "::1"
    assert d.name == "tcp [::1]:4"


def test_keepalive_and_backlog_defaults_are_gos_and_the_systems() -> None:
    # Goma's examples load as they always did, with the two defaults set.
    for name in ("goma-minimal.yaml", "goma-full.yaml"):
        for forward in load_config(ROOT / "etc" / name).forwards:
            assert forward.keepalive == DEFAULT_KEEPALIVE == 15
            assert forward.backlog is None


@pytest.mark.parametrize(
    ("given", "seconds"),
    [("30", 30.0), ("1", 1.0), ("32767", 32767.0), ("true", 15.0), ("false", None), ("off", None)],
)
def test_keepalive(given: str, seconds: float | None) -> None:
    config = parse_config(
        forwards(f"{{protocol: tcp, port: 1, target: 'a:1', keepalive: {given}}}")
    )
    assert config.forwards[0].keepalive == seconds


def test_backlog() -> None:
    config = parse_config(
        forwards(
            "{protocol: tcp, port: 1, target: 'a:1', backlog: 1}",
            "{protocol: tcp/udp, port: 2, target: 'a:1', backlog: 65535}",
        )
    )
    assert [forward.backlog for forward in config.forwards] == [1, 65535]


def test_keepalive_as_the_relay_sets_it() -> None:
    # What the relay sets on both sockets, from the config alone (no socket).
    on, off = parse_config(
        forwards(
            "{protocol: tcp, port: 1, target: 'a:1', keepalive: 30}",
            "{protocol: tcp, port: 2, target: 'a:1', keepalive: false}",
        )
    ).forwards
    assert (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1) in keepalive_options(on.keepalive)
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30) in keepalive_options(on.keepalive)
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 30) in keepalive_options(on.keepalive)
    assert (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 9) in keepalive_options(on.keepalive)
    assert keepalive_options(off.keepalive) == [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 0)]


@pytest.fixture(params=["installed", "Python"])
def yaml_loader(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """
    Run on the YAML loader PyYAML has here (libyaml's, where it was built
    with it) and on PyYAML's own Python one (PyPy's: its PyYAML has no
    libyaml); return which of the two the test runs on.
    """
    if request.param == "Python":
        monkeypatch.delattr(yaml, "CSafeLoader", raising=False)
    return "libyaml" if hasattr(yaml, "CSafeLoader") else "Python"


def errors(text: str | bytes) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "goma.yml")
    return [str(problem) for problem in caught.value.problems]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "goma.yml:1:1: the file is empty"),
        ("- 1\n", "goma.yml:1:1: (top level): expected a mapping, got a list"),
        ("version: 2\n", "gateway: missing; expected a mapping"),
        ("gateway:\n  entryPoints: 3\n", "goma.yml:2:16: gateway.entryPoints: expected a mapping"),
        (
            "gateway:\n  entryPoints:\n    passThrough:\n      forwards: {}\n",
            "goma.yml:4:17: forwards: expected a list of forwards, got a mapping",
        ),
        (
            "gateway:\n  entryPoints:\n    passThrough:\n      forwards: []\n",
            "forwards: the list is empty",
        ),
        (
            "gateway:\n  entryPoints:\n    passThrough:\n      forward: []\n",
            "goma.yml:4:7: gateway.entryPoints.passThrough.forward: unknown key; "
            "did you mean `forwards`?",
        ),
        (
            forwards("{protcol: tcp, port: 1, target: 'a:1'}"),
            "goma.yml:5:12: forwards[0].protcol: unknown key; did you mean `protocol`?",
        ),
        (
            forwards("{protocol: sctp, port: 1, target: 'a:1'}"),
            "goma.yml:5:22: forwards[0].protocol: got a string ('sctp'); "
            "expected tcp, udp or tcp/udp",
        ),
        (
            forwards("{protocol: tcp, port: 0, target: 'a:1'}"),
            "forwards[0].port: got an integer ('0'); expected 1 to 65535",
        ),
        (
            forwards("{protocol: tcp, port: '22', target: 'a:1'}"),
            "forwards[0].port: got a string ('22'); expected 1 to 65535",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: ''}"),
            "forwards[0].target: no port in ''",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:0'}"),
            "forwards[0].target: port '0' is not 1 to 65535 in 'a:0'",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: '::1:53'}"),
            "forwards[0].target: an IPv6 address must be in brackets in '::1:53'",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: '[::zz]:53'}"),
            "forwards[0].target: '::zz' is not an IPv6 address",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', timeout: 0}"),
            "forwards[0].timeout: got an integer ('0'); "
            "expected a number of seconds greater than 0",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', timeout: .nan}"),
            "forwards[0].timeout: got a number ('.nan')",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', address: localhost}"),
            "forwards[0].address: got a string ('localhost'); expected an IP address",
        ),
        (
            forwards(
                "{protocol: tcp/udp, port: 53, target: 'a:1'}",
                "{protocol: udp, port: 53, target: 'b:1'}",
            ),
            "forwards[1]: udp port 53 is already forwarded by forwards[0] (tcp/udp 53 -> a:1)",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', keepalive: 0}"),
            "goma.yml:5:62: forwards[0].keepalive: got an integer ('0'); "
            "to switch keepalive off, write false (0 is Go's default, 15 s)",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', keepalive: 7.5}"),
            "forwards[0].keepalive: got a number ('7.5'); expected a whole number of seconds, "
            "1 to 32767, or false to switch keepalive off",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', keepalive: 32768}"),
            "forwards[0].keepalive: got an integer ('32768'); expected a whole number",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', keepalive: 15s}"),
            "forwards[0].keepalive: got a string ('15s'); expected a whole number",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', keepAlive: 15}"),
            "forwards[0].keepAlive: unknown key; did you mean `keepalive`?",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', backlog: 0}"),
            "goma.yml:5:60: forwards[0].backlog: got an integer ('0'); expected a listen "
            "backlog, 1 to 65535 (without the key: the system's net.core.somaxconn)",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', backlog: 65536}"),
            "forwards[0].backlog: got an integer ('65536'); expected a listen backlog",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', backlog: true}"),
            "forwards[0].backlog: got a boolean ('true'); expected a listen backlog",
        ),
        (
            forwards("{protocol: tcp, port: 1, target: 'a:1', backlg: 100}"),
            "forwards[0].backlg: unknown key; did you mean `backlog`?",
        ),
        (
            forwards("{protocol: udp, port: 1, target: 'a:1', backlog: 100}"),
            "forwards[0].backlog: applies to tcp forwards only; this forward is udp",
        ),
        (
            forwards("{protocol: udp, port: 1, target: 'a:1', keepalive: false}"),
            "forwards[0].keepalive: applies to tcp forwards only; this forward is udp",
        ),
        (b"gateway: \xff\n", "goma.yml:1:10: byte 0xff is not UTF-8"),
    ],
)
def test_errors_name_the_place_and_the_problem(
    text: str | bytes, expected: str, yaml_loader: str
) -> None:
    found = errors(text)
    assert any(expected in problem for problem in found), found


def test_invalid_yaml_is_placed_at_the_end_of_the_file(yaml_loader: str) -> None:
    # The end of a file without a final newline: libyaml places it on the
    # line after, PyYAML's Python loader just after the last character.
    [problem] = errors("gateway: [")
    place = "goma.yml:2:1" if yaml_loader == "libyaml" else "goma.yml:1:11"
    assert problem.startswith(f"{place}: not valid YAML: "), problem


def test_every_problem_is_reported_at_once() -> None:
    found = errors(
        forwards(
            "{protocol: tcp, port: 70000, target: 'a:1'}",
            "{protocol: udp, port: 5, target: 'nope'}",
            "{protocol: tcp, port: 6, target: 'a:1', timeuot: 3}",
            "{protocol: tcp, port: 7, target: 'a:1', keepalive: 0, backlog: -1}",
        )
    )
    assert [p.split(": ")[1] for p in found] == [
        "forwards[0].port",
        "forwards[1].target",
        "forwards[2].timeuot",
        "forwards[3].keepalive",
        "forwards[3].backlog",
    ]


def test_same_port_on_different_addresses_is_no_clash() -> None:
    config = parse_config(
        forwards(
            "{protocol: tcp, port: 53, target: 'a:1', address: 127.0.0.1}",
            "{protocol: tcp, port: 53, target: 'b:1', address: 127.0.0.2}",
            "{protocol: udp, port: 53, target: 'c:1'}",
        )
    )
    assert len(config.forwards) == 3


def refused(text: str | bytes, tmp_path: Path) -> tuple[Problem, float]:
    """The one problem goma-pt finds in C{text}, read from a file, and the seconds it took."""
    path = tmp_path / "goma.yml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    started = time.monotonic()
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    elapsed = time.monotonic() - started
    (problem,) = caught.value.problems
    assert problem.source == str(path)
    assert str(caught.value).startswith(f"{path}:")
    return problem, elapsed


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8)
)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(ALIAS_BOMB, id="alias bomb"),
        pytest.param("[" * 100_000, id="flow nesting on one line"),
        pytest.param("{" * 100_000, id="flow mappings on one line"),
        pytest.param("[\n" * 100_000, id="flow nesting over lines"),
        pytest.param("- " * 50_000, id="block nesting"),
        pytest.param(b"#" * (5 * 1024 * 1024), id="5 MiB"),
    ],
)
def test_hostile_documents_are_refused_quickly(text: str | bytes, tmp_path: Path) -> None:
    # Which limit fires first may be PyYAML's (libyaml's own nesting
    # limit), so the wording is not asserted: one ConfigError naming the
    # file, at once, and nothing else escaping (no RecursionError).
    _, elapsed = refused(text, tmp_path)
    assert elapsed < 2.0


BLOCK_NEST = "a:\n" + "".join("  " * i + "- \n" for i in range(1, 100))


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        (ALIAS_BOMB, "the document has more than 200000 values", 1),
        ("[" * 65 + "]" * 65, "nested more than 64 levels deep", 1),
        (BLOCK_NEST, "nested more than 64 levels deep", 65),
        (b"#" * (5 * 1024 * 1024), "the file is larger than 4 MiB; is it a config?", 1),
    ],
)
def test_goma_pt_own_limits(text: str | bytes, message: str, line: int, tmp_path: Path) -> None:
    # Below any limit of PyYAML's, these are goma-pt's own refusals.
    problem, _ = refused(text, tmp_path)
    assert (problem.message, problem.line) == (message, line)


def test_nesting_up_to_the_limit_is_fine() -> None:
    # The top mapping and 63 lists: 64 levels load, 65 do not.
    config = parse_config(MINIMAL + "x-extra: " + "[" * 63 + "]" * 63 + "\n", "goma.yml")
    assert config.ignored == ("x-extra",)
    deeper = MINIMAL + "x-extra: " + "[" * 64 + "]" * 64 + "\n"
    assert errors(deeper) == ["goma.yml:8:73: nested more than 64 levels deep"]


def test_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read the file: No such file or directory"):
        load_config(tmp_path / "missing.yml")


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("srv1.example.com:61557", "srv1.example.com", 61557),
        ("10.25.10.15:53", "10.25.10.15", 53),
        ("[::1]:53", "::1", 53),
        ("backend_1:80", "backend_1", 80),
        ("localhost.:8080", "localhost.", 8080),
    ],
)
def test_targets(text: str, host: str, port: int) -> None:
    assert parse_target(text) == (Target(host, port), "")


@pytest.mark.parametrize(
    ("host", "port", "shown"),
    [
        ("127.0.0.1", 80, "127.0.0.1:80"),
        ("::1", 53, "[::1]:53"),
        ("::ffff:192.0.2.1", 5000, "192.0.2.1:5000"),
        ("srv1.example.com", 22, "srv1.example.com:22"),
    ],
)
def test_addresses_as_logs_show_them(host: str, port: int, shown: str) -> None:
    assert format_address(host, port) == shown


def test_guard_keys() -> None:
    config = parse_config(
        forwards(
            "{protocol: tcp/udp, port: 1, target: 'a:1', allow: [10.0.0.0/8, '2001:db8::/32'],"
            " deny: 10.9.9.9, maxConnections: 100, maxConnectionsPerIp: 5, maxSessions: 50,"
            " maxSessionsPerIp: 2, proxyProtocol: 2,"
            " acceptProxyProtocol: ['::ffff:192.0.2.0/120']}",
            "{protocol: tcp, port: 2, target: 'a:1'}",
        )
    )
    a, b = config.forwards
    assert a.allow == (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))
    assert a.deny == (ipaddress.ip_network("10.9.9.9/32"),)
    assert (a.max_connections, a.max_connections_per_ip) == (100, 5)
    assert (a.max_sessions, a.max_sessions_per_ip) == (50, 2)
    assert a.proxy_protocol == 2
    # An IPv4-mapped block is the IPv4 block it names: clients match as IPv4.
    assert a.accept_proxy_protocol == (ipaddress.ip_network("192.0.2.0/24"),)
    assert a.policy.permits(ipaddress.ip_address("10.1.2.3"))
    assert not a.policy.permits(ipaddress.ip_address("10.9.9.9"))
    assert (b.allow, b.deny, b.accept_proxy_protocol) == ((), (), ())
    assert (b.max_connections, b.max_connections_per_ip, b.proxy_protocol) == (None, None, None)
    assert not b.policy
    assert not a.reuse_port and not b.reuse_port


def test_reuse_port_key() -> None:
    config = parse_config(
        forwards(
            "{protocol: tcp/udp, port: 1, target: 'a:1', reusePort: true}",
            "{protocol: tcp, port: 2, target: 'a:1', reusePort: false}",
        )
    )
    assert [f.reuse_port for f in config.forwards] == [True, False]


@pytest.mark.parametrize(
    ("item", "expected"),
    [
        (
            "allow: [10.0.0.0/8, 10.0.0.1/8]",
            "goma.yml:5:71: forwards[0].allow[1]: '10.0.0.1/8' has bits set after the prefix; "
            "did you mean 10.0.0.0/8?",
        ),
        (
            "deny: [example.com]",
            "forwards[0].deny[0]: 'example.com' is not an IP address or CIDR block",
        ),
        ("deny: ['10.0.0.0/33']", "forwards[0].deny[0]: '10.0.0.0/33' is not an IP address"),
        ("allow: []", "forwards[0].allow: the list is empty"),
        ("allow: {a: 1}", "forwards[0].allow: got a mapping; expected a list of IP addresses"),
        ("allow: [1]", "forwards[0].allow[0]: got an integer ('1'); expected a list of IP"),
        (
            "maxConnections: 0",
            "forwards[0].maxConnections: got an integer ('0'); expected a whole",
        ),
        ("maxConnectionsPerIp: -1", "forwards[0].maxConnectionsPerIp: got an integer ('-1')"),
        ("proxyProtocol: 3", "forwards[0].proxyProtocol: got an integer ('3'); expected 1 (text"),
        ("proxyProtocol: v2", "forwards[0].proxyProtocol: got a string ('v2'); expected 1"),
        ("acceptProxyProtocol: true", "forwards[0].acceptProxyProtocol: got a boolean ('true')"),
        ("reusePort: 1", "forwards[0].reusePort: got an integer ('1'); expected true or false"),
        ("reusePort: on-ish", "forwards[0].reusePort: got a string ('on-ish'); expected true"),
        (
            "maxSessions: 10",
            "forwards[0].maxSessions: applies to udp forwards only; this forward is tcp "
            "(use protocol: tcp/udp for both)",
        ),
        ("maxSessionsPerIp: 10", "forwards[0].maxSessionsPerIp: applies to udp forwards only"),
        ("maxConnectioms: 10", "forwards[0].maxConnectioms: unknown key; did you mean"),
    ],
)
def test_guard_key_errors(item: str, expected: str) -> None:
    found = errors(forwards(f"{{protocol: tcp, port: 1, target: 'a:1', {item}}}"))
    assert any(expected in problem for problem in found), found


@pytest.mark.parametrize(
    "item",
    [
        "maxConnections: 1",
        "maxConnectionsPerIp: 1",
        "proxyProtocol: 1",
        "acceptProxyProtocol: ['::1']",
    ],
)
def test_tcp_keys_on_a_udp_forward_are_errors(item: str) -> None:
    key = item.split(":")[0]
    found = errors(forwards(f"{{protocol: udp, port: 1, target: 'a:1', {item}}}"))
    assert [f"forwards[0].{key}: applies to tcp forwards only" in p for p in found] == [True]
