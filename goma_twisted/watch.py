"""
Reloading when the config file changes (C{--watch}).

The file's directory is watched with inotify (L{twisted.internet.inotify}),
not the file itself: editors replace a file by renaming a new one over it,
and Kubernetes updates a mounted ConfigMap by swapping a symlink in that
directory (C{..data}), neither of which an inotify watch on the old file
sees. An event there on the file's own name, on a name of Kubernetes'
(C{..data} and the folders it points to, all beginning with C{..}), or on
the directory itself starts a short quiet period (the debounce); events on
other files (a log written next to the config) are ignored, or they would
hold the reload back for as long as they go on. When the quiet period
ends, the file is read, and only if its bytes changed is the reload asked
for, through the same path as SIGHUP. Where inotify cannot be had, the file
is polled instead.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.filepath import FilePath

log = Logger(namespace="goma_pt")

# Seconds without a new event before the file is read: an editor's save or
# a ConfigMap swap is several events within milliseconds.
DEBOUNCE = 0.5
# Seconds between reads where inotify cannot be had.
POLL_INTERVAL = 2.0


def fingerprint(path: str) -> str | None:
    """A digest of the file's bytes (through any symlinks), or None if it cannot be read."""
    try:
        with open(path, "rb") as f:
            return hashlib.sha256(f.read()).hexdigest()
    except OSError:
        return None


class ConfigWatcher:
    """
    Calls C{changed()} once the file at C{path} has new bytes and has been
    quiet for L{DEBOUNCE} seconds.

    @param reactor: runs the inotify watch (None: poll only).
    @param clock: runs the debounce and the polling (the reactor, or a Clock).
    """

    def __init__(
        self, path: str, changed: Callable[[], object], reactor: Any, clock: Any = None
    ) -> None:
        self.path = path
        self.changed = changed
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.seen = fingerprint(path)
        # The file's directory, and where a symlink to it leads (a file
        # elsewhere is edited there).
        given, real = FilePath(path), FilePath(os.path.realpath(path))
        self.directories = {given.parent(), real.parent()}
        self.names = {given.basename(), real.basename()}
        self._pending: IDelayedCall | None = None
        self._notifier: Any = None
        self._poll: LoopingCall | None = None

    def start(self) -> str:
        """Start watching; says how (C{inotify} or C{polling})."""
        notifier = None
        try:
            from twisted.internet import inotify

            notifier = inotify.INotify(self.reactor)
            notifier.startReading()
            for directory in self.directories:
                notifier.watch(directory, callbacks=[self._event])
        except Exception as e:  # no inotify here, or no watches left
            if notifier is not None:
                notifier.loseConnection()
            log.info("Watching {path} by polling ({why})", path=self.path, why=str(e))
            self._poll = LoopingCall(self.check)
            self._poll.clock = self.clock
            self._poll.start(POLL_INTERVAL, now=False)
            return "polling"
        self._notifier = notifier
        return "inotify"

    def stop(self) -> None:
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None
        if self._notifier is not None:
            self._notifier.loseConnection()
            self._notifier = None
        if self._poll is not None and self._poll.running:
            self._poll.stop()
        self._poll = None

    def _event(self, watch: Any, path: FilePath[Any], mask: int) -> None:
        path = path.asTextMode()  # inotify names the changed file in bytes
        if path in self.directories or self.concerns(path.basename()):
            self.poke()

    def concerns(self, name: str) -> bool:
        """Whether a change to C{name} in the directory may change the file."""
        return name in self.names or name.startswith("..")

    def poke(self) -> None:
        """Something in the directory changed: check once it has been quiet."""
        if self._pending is not None and self._pending.active():
            self._pending.reset(DEBOUNCE)
        else:
            self._pending = self.clock.callLater(DEBOUNCE, self.check)

    def check(self) -> None:
        """Ask for a reload if the file's bytes are new (a file being replaced: later)."""
        self._pending = None
        now = fingerprint(self.path)
        if now is None or now == self.seen:
            return
        self.seen = now
        self.changed()
