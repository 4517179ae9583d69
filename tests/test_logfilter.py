"""The bound on how often Twisted's listening ports may log, without sockets."""

from __future__ import annotations

from typing import Any

from twisted.internet.task import Clock
from twisted.logger import LogLevel

from goma_twisted.logfilter import LISTENING_PORTS, LOG_PREFIX, RateLimitedObserver


def _event(namespace: str = LISTENING_PORTS[0], text: str = "x") -> dict[str, Any]:
    return {"log_namespace": namespace, "log_format": text, "log_level": LogLevel.info}


def test_one_event_per_interval_then_a_count_of_those_left_out() -> None:
    clock = Clock()
    seen: list[dict[str, Any]] = []
    observer = RateLimitedObserver(seen.append, clock.seconds, interval=10)
    for number in range(300):
        observer(_event(text=f"drop {number}"))
        clock.advance(0.01)
    assert [event["log_format"] for event in seen] == ["drop 0"]
    clock.advance(10)
    observer(_event(text="later"))
    note, later = seen[1:]
    assert (note["left"], note["source"], note["log_level"]) == (
        299,
        LISTENING_PORTS[0],
        LogLevel.warn,
    )
    assert later["log_format"] == "later"


def test_other_namespaces_pass_untouched() -> None:
    clock = Clock()
    seen: list[dict[str, Any]] = []
    observer = RateLimitedObserver(seen.append, clock.seconds)
    for _ in range(50):
        observer(_event("goma_pt.tcp"))
        observer({"log_format": "no namespace"})
    assert len(seen) == 100


def test_the_line_a_goma_pt_port_logs_as_it_starts_is_left_out() -> None:
    clock = Clock()
    seen: list[dict[str, Any]] = []
    observer = RateLimitedObserver(seen.append, clock.seconds)
    legacy = {"log_namespace": "log_legacy", "log_level": LogLevel.info}
    observer(legacy | {"message": (f"{LOG_PREFIX} starting on 8080",)})
    observer(legacy | {"message": ("Site starting on 9108",)})
    observer(legacy | {"message": ("(TCP Port 8080 Closed)",)})
    assert [event["message"] for event in seen] == [
        ("Site starting on 9108",),
        ("(TCP Port 8080 Closed)",),
    ]
