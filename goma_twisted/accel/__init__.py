"""
goma-pt's accelerations: everything that uses Twisted's private names or
replaces its machinery (an epoll reactor without the logging context per
event, hand-built TCP transports, an own accept loop, direct sends, raw
I/O and splice on PyPy), behind one seam.

The plain relay (L{goma_twisted.tcp}) never imports this package;
L{goma_twisted.relaychoice} does, only when the accelerated relay may run.
L{unavailable} says whether it may: on a Twisted version it was tested
with, on Linux, with every private name it uses present.
"""

from __future__ import annotations

import sys
from typing import Any

from twisted.internet import tcp

import twisted

# The Twisted releases (major.minor) CI runs the accelerated relay on.
TESTED_TWISTED = ("24.7", "26.4", "26.10")


def twisted_release(version: str = twisted.__version__) -> str:
    """C{major.minor} of a Twisted version string."""
    return ".".join(version.split(".")[:2])


def unavailable(reactor: Any = None, version: str = twisted.__version__) -> str | None:
    """Why the accelerated relay cannot run here (on C{reactor}, if given), or None."""
    release = twisted_release(version)
    if release not in TESTED_TWISTED:
        return f"Twisted {release} is not one the accelerations were tested with"
    if not sys.platform.startswith("linux"):
        return f"the accelerations are for Linux, not {sys.platform}"
    from . import io, transports

    missing = [name for name in io.PRIVATE_FIELDS if not _transportHas(name)]
    if missing or not transports.LEAN:
        names = ", ".join(missing) or "its TCP transport's construction"
        return f"Twisted {release} lacks what the accelerations use ({names})"
    if reactor is not None and not transports.lean(reactor):
        return f"the reactor {type(reactor).__name__} is not Twisted's POSIX reactor"
    return None


def _transportHas(name: str) -> bool:
    # FileDescriptor.__init__ sets _tempDataLen; the rest are class attributes.
    return name == "_tempDataLen" or hasattr(tcp.Connection, name)


def install_reactor() -> bool:
    """
    Install goma-pt's epoll reactor as the global one, unless one is
    installed already or this system has no epoll; whether it did.
    """
    if "twisted.internet.reactor" in sys.modules:
        return False
    try:
        from .reactor import install
    except ImportError:
        return False
    install()
    return True
