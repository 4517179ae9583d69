"""
The loader never fails in any way but its own: arbitrary YAML documents and
mutations of valid configs give a config or a ConfigError, nothing else.
"""

from __future__ import annotations

from typing import Any

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from goma_twisted.config import FORWARD_KEYS, ConfigError, GatewayConfig, parse_config

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["tcp", "udp", "tcp/udp", "a:1", "[::1]:53", "1.2.3.4:5", "::1:53", ""]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.one_of(st.text(max_size=12), st.sampled_from(FORWARD_KEYS)), inner, max_size=5
        ),
    ),
    max_leaves=25,
)


def check(document: str | bytes) -> None:
    try:
        config = parse_config(document, "fuzz.yml")
    except ConfigError as e:
        assert e.problems
        assert all(problem.message for problem in e.problems)
    else:
        assert isinstance(config, GatewayConfig)
        assert config.forwards


@settings(max_examples=300, deadline=None)
@given(values)
def test_arbitrary_documents(value: Any) -> None:
    check(yaml.safe_dump(value))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(st.sampled_from(FORWARD_KEYS), scalars, max_size=6), max_size=4))
def test_arbitrary_forwards(forwards: list[dict[str, Any]]) -> None:
    check(yaml.safe_dump({"gateway": {"entryPoints": {"passThrough": {"forwards": forwards}}}}))


VALID = (
    "gateway:\n  entryPoints:\n    passThrough:\n      forwards:\n"
    "        - protocol: tcp/udp\n          port: 53\n          target: '[::1]:53'\n"
    "          timeout: 5\n"
)


@settings(max_examples=500, deadline=None)
@given(st.data())
def test_mutations_of_a_valid_config(data: st.DataObject) -> None:
    raw = bytearray(VALID.encode())
    for _ in range(data.draw(st.integers(1, 4))):
        where = data.draw(st.integers(0, len(raw)))
        action = data.draw(st.sampled_from(["insert", "delete", "replace"]))
        byte = data.draw(st.integers(0, 255))
        if action == "insert":
            raw.insert(where, byte)
        elif where < len(raw):
            if action == "delete":
                del raw[where]
            else:
                raw[where] = byte
    check(bytes(raw))
