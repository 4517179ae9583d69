"""
Read a Goma Gateway config file into frozen values that goma-pt acts on.

Only C{gateway.entryPoints.passThrough} is acted on and checked strictly;
the rest of a Goma config (routes, middlewares, other entry points) is
accepted as it is, so that goma-pt can read the very file Goma reads.

Every problem found is collected, with its file, line and column, so an
operator fixes a file in one pass instead of one error per restart.

The work is in three modules, each importable from here:
L{config_values} (the values: L{Forward}, L{Target}, L{GatewayConfig},
L{ConfigError}), L{config_yaml} (bytes to YAML nodes with their marks,
within bounds) and L{config_check} (the field checks).
"""

from __future__ import annotations

from pathlib import Path

from .config_check import FORWARD_KEYS, TCP_ONLY_KEYS, UDP_ONLY_KEYS, check
from .config_values import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_KEEPALIVE,
    DEFAULT_UDP_IDLE_TIMEOUT,
    PROTOCOLS,
    ConfigError,
    Forward,
    GatewayConfig,
    Problem,
    Target,
    format_address,
    parse_target,
)
from .config_yaml import MAX_DEPTH, MAX_FILE_BYTES, MAX_NODES, compose

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_KEEPALIVE",
    "DEFAULT_UDP_IDLE_TIMEOUT",
    "FORWARD_KEYS",
    "MAX_DEPTH",
    "MAX_FILE_BYTES",
    "MAX_NODES",
    "PROTOCOLS",
    "TCP_ONLY_KEYS",
    "UDP_ONLY_KEYS",
    "ConfigError",
    "Forward",
    "GatewayConfig",
    "Problem",
    "Target",
    "format_address",
    "load_config",
    "load_config_or_exit",
    "parse_config",
    "parse_target",
]


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
    return check(compose(data, source), source)


def load_config_or_exit(path: str | Path) -> GatewayConfig:
    """
    L{load_config} for a C{.tac} file: a file that cannot be used ends
    twistd with its problems in a few lines, without a traceback. (twistd
    shows any exception from a C{.tac} with its traceback; it lets
    C{SystemExit} through, which prints its message and exits 1.)
    """
    try:
        return load_config(path)
    except ConfigError as e:
        raise SystemExit(f"goma-pt: {e}") from None
