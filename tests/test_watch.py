"""
--watch: the config file's changes ask for a reload once quiet, including a
Kubernetes ConfigMap's symlink swap; the same bytes ask for nothing.
"""

from __future__ import annotations

import os
import socket
import socketserver
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.task import Clock, deferLater
from twisted.python.filepath import FilePath

from goma_twisted.watch import DEBOUNCE, ConfigWatcher

from .support import free_port, goma_pt_running, until, wait_for, write_config


def test_a_burst_of_events_asks_for_one_reload_once_quiet(tmp_path: Path) -> None:
    config = tmp_path / "goma.yml"
    config.write_text("first")
    clock = Clock()
    asked: list[None] = []
    watcher = ConfigWatcher(str(config), lambda: asked.append(None), None, clock)
    config.write_text("second")
    for _ in range(5):  # an editor's save: several events within moments
        watcher.poke()
        clock.advance(DEBOUNCE / 2)
    assert asked == []
    clock.advance(DEBOUNCE)
    assert asked == [None]
    watcher.poke()  # an event without new bytes (a touch)
    clock.advance(DEBOUNCE)
    assert asked == [None]


def test_a_file_missing_for_a_moment_asks_for_nothing(tmp_path: Path) -> None:
    config = tmp_path / "goma.yml"
    config.write_text("first")
    clock = Clock()
    asked: list[None] = []
    watcher = ConfigWatcher(str(config), lambda: asked.append(None), None, clock)
    config.unlink()
    watcher.poke()
    clock.advance(DEBOUNCE)
    assert asked == []
    config.write_text("first")
    watcher.poke()
    clock.advance(DEBOUNCE)
    assert asked == []  # back as it was


def _configmap(directory: Path, version: str, text: str) -> None:
    """What the kubelet does: a new timestamped folder, then ..data swapped to it."""
    (directory / version).mkdir()
    (directory / version / "goma.yml").write_text(text)
    os.symlink(version, directory / "..data_tmp")
    os.rename(directory / "..data_tmp", directory / "..data")


@pytest_twisted.ensureDeferred
async def test_a_configmap_update_is_seen_through_its_symlinks(
    reactor: Any, tmp_path: Path
) -> None:
    _configmap(tmp_path, "..2026_12_04_01", "first")
    os.symlink("..data/goma.yml", tmp_path / "goma.yml")
    asked: list[None] = []
    watcher = ConfigWatcher(str(tmp_path / "goma.yml"), lambda: asked.append(None), reactor)
    assert watcher.start() == "inotify"
    try:
        await deferLater(reactor, 0.05)
        _configmap(tmp_path, "..2026_12_04_02", "second")
        await until(reactor, lambda: asked, 5)
        await deferLater(reactor, DEBOUNCE * 2)
        assert asked == [None]
    finally:
        watcher.stop()


class _Tagging(socketserver.BaseRequestHandler):
    """Echoes each read with the server's tag in front."""

    def handle(self) -> None:
        while data := self.request.recv(4096):
            self.request.sendall(self.server.tag + data)  # type: ignore[attr-defined]


@pytest.fixture
def tagged() -> Iterator[dict[bytes, int]]:
    """Two TCP servers, A and B, on loopback ports: {tag: port}."""
    servers = {}
    for tag in (b"A:", b"B:"):
        server = socketserver.ThreadingTCPServer(("127.0.0.1", free_port()), _Tagging)
        server.daemon_threads = True
        server.tag = tag  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers[tag] = server
    yield {tag: server.server_address[1] for tag, server in servers.items()}
    for server in servers.values():
        server.shutdown()
        server.server_close()


def _ask(skt: socket.socket, text: bytes) -> bytes:
    skt.sendall(text)
    return skt.recv(100)


def test_twistd_watch_follows_an_edit_and_keeps_live_connections(
    tmp_path: Path, tagged: dict[bytes, int]
) -> None:
    port = free_port()
    config = tmp_path / "goma.yml"

    def forwarding_to(tag: bytes) -> None:
        target = f"127.0.0.1:{tagged[tag]}"
        write_config(config, [{"protocol": "tcp", "port": port, "target": target}])

    forwarding_to(b"A:")
    log = tmp_path / "goma.log"
    with goma_pt_running(config, log, "--watch"):
        # Logged just after "goma-pt ready", which is what goma_pt_running waits for.
        wait_for(lambda: "Watching" in log.read_text(), what="the watch")
        live = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert _ask(live, b"one") == b"A:one"
        forwarding_to(b"B:")
        wait_for(lambda: "Reloaded" in log.read_text(), what="the reload")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as new:
            assert _ask(new, b"two") == b"B:two"
        assert _ask(live, b"three") == b"A:three"  # the live one keeps its target
        config.write_text("gateway: {entryPoints: {passThrough: {forwards: [{port: 1}]}}}\n")
        wait_for(lambda: "Reload rejected" in log.read_text(), what="the rejection")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as after:
            assert _ask(after, b"four") == b"B:four"
        live.close()
    assert log.read_text().count("changed: reloading") == 2


def test_other_files_in_the_directory_do_not_hold_back_the_reload(tmp_path: Path) -> None:
    # A --logfile next to the config is written on every connection; its
    # events must not keep postponing the reload of an edited config.
    config = tmp_path / "goma.yml"
    config.write_text("first")
    clock = Clock()
    asked: list[None] = []
    watcher = ConfigWatcher(str(config), lambda: asked.append(None), None, clock)
    config.write_text("second")
    watcher._event(None, FilePath(str(config)), 0)
    for _ in range(20):
        clock.advance(DEBOUNCE / 5)
        watcher._event(None, FilePath(bytes(tmp_path / "goma.log")), 0)
    assert asked == [None]


def test_a_configmap_swap_and_the_directory_itself_are_events(tmp_path: Path) -> None:
    config = tmp_path / "goma.yml"
    config.write_text("first")
    clock = Clock()
    asked: list[None] = []
    watcher = ConfigWatcher(str(config), lambda: asked.append(None), None, clock)
    config.write_text("second")
    watcher._event(None, FilePath(str(tmp_path / "..data")), 0)
    clock.advance(DEBOUNCE)
    assert asked == [None]
    config.write_text("third")
    watcher._event(None, FilePath(str(tmp_path)), 0)
    clock.advance(DEBOUNCE)
    assert asked == [None, None]


def test_a_watch_that_cannot_be_set_leaves_no_inotify_open(
    reactor: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from twisted.internet import inotify

    def no_watches_left(*args: Any, **kwargs: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(inotify.INotify, "watch", no_watches_left)
    config = tmp_path / "goma.yml"
    config.write_text("first")
    readers = set(reactor.getReaders())
    watcher = ConfigWatcher(str(config), lambda: None, reactor)
    assert watcher.start() == "polling"
    try:
        assert set(reactor.getReaders()) == readers
    finally:
        watcher.stop()


@pytest_twisted.ensureDeferred
async def test_a_config_symlinked_from_elsewhere_is_watched_where_it_is(
    reactor: Any, tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    real = tmp_path / "real" / "goma.yml"
    real.write_text("first")
    os.symlink(real, tmp_path / "etc" / "goma.yml")
    asked: list[None] = []
    watcher = ConfigWatcher(
        str(tmp_path / "etc" / "goma.yml"), lambda: asked.append(None), reactor
    )
    assert watcher.start() == "inotify"
    try:
        await deferLater(reactor, 0.05)
        real.write_text("second")  # edited where it is, not through the link
        await until(reactor, lambda: asked, 5)
        assert asked == [None]
    finally:
        watcher.stop()
