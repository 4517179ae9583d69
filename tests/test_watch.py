"""
--watch: the config file's changes ask for a reload once quiet, including a
Kubernetes ConfigMap's symlink swap; the same bytes ask for nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.task import Clock, deferLater

from goma_twisted.watch import DEBOUNCE, ConfigWatcher

from .support import until


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
