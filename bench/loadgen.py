"""Small bounded load generators and backends the stock tools do not provide.

Run as a script (one process per role, so each has its own file descriptors and GIL):

  loadgen.py hold-server PORT STATUS          accept and hold connections, count them
  loadgen.py hold-client PORT N STATUS SERVER_STATUS
                                              open N idle connections and hold them, keeping
                                              at most CONNECT_AHEAD not yet seen by hold-server
  loadgen.py slow-server PORT RATE SECONDS    accept one connection, read RATE bytes/s
  loadgen.py blast PORT SECONDS MAX_BYTES     send as fast as possible, bounded
  loadgen.py udp-churn PORT SECONDS MAX_Q PAR each DNS query from a new UDP socket

Every role stops by itself (a time limit), or earlier when its stdin closes.
Traffic goes to 127.0.0.1 only. Results are one JSON line on stdout (or in STATUS).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import selectors
import socket
import struct
import sys
import time
from pathlib import Path

HOST = "127.0.0.1"
HOLD_LIMIT_S = 300.0
CONNECT_INFLIGHT = 32
CONNECT_AHEAD = 40  # below the smallest listen backlog (Twisted: 50)


def _raise_nofile() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def _write_status(path: Path, status: dict[str, object]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(status))
    tmp.replace(path)


def _stdin_closed(sel: selectors.BaseSelector, timeout: float) -> bool:
    """Wait up to `timeout` for stdin EOF (the parent's stop signal)."""
    for key, _ in sel.select(timeout):
        if key.data == "stdin" and not os.read(sys.stdin.fileno(), 4096):
            return True
    return False


def hold_server(port: int, status: Path) -> None:
    """Accept connections and keep them open; report how many are held."""
    listener = socket.create_server((HOST, port), backlog=4096)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "listen")
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    held: list[socket.socket] = []
    errors = 0
    deadline = time.monotonic() + HOLD_LIMIT_S
    _write_status(status, {"held": 0, "errors": 0})
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            if key.data == "stdin":
                if not os.read(sys.stdin.fileno(), 4096):
                    return
            else:
                errors += _accept_all(listener, held)
        _write_status(status, {"held": len(held), "errors": errors})


def _accept_all(listener: socket.socket, held: list[socket.socket]) -> int:
    errors = 0
    for _ in range(1024):
        try:
            conn, _addr = listener.accept()
        except BlockingIOError:
            break
        except OSError:
            errors += 1
            break
        held.append(conn)
    return errors


def _held(server_status: Path) -> int:
    try:
        return int(json.loads(server_status.read_text()).get("held", 0))
    except (OSError, ValueError):
        return 0


def hold_client(port: int, count: int, status: Path, server_status: Path) -> None:
    """Open `count` idle TCP connections and hold them.

    At most CONNECT_INFLIGHT connects are pending, and at most CONNECT_AHEAD connections are
    ahead of what the backend (hold-server) has accepted, so that a forwarder with a short
    listen backlog is not flooded into SYN retransmits.
    """
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ, "stdin")
    done: list[socket.socket] = []
    failed = 0
    pending = 0
    started = 0
    deadline = time.monotonic() + 120.0
    while (started < count or pending) and time.monotonic() < deadline:
        ahead_ok = len(done) + pending - _held(server_status) < CONNECT_AHEAD
        while started < count and pending < CONNECT_INFLIGHT and ahead_ok:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setblocking(False)
            err = sock.connect_ex((HOST, port))
            started += 1
            if err not in (0, errno.EINPROGRESS):
                sock.close()
                failed += 1
                continue
            sel.register(sock, selectors.EVENT_WRITE, "conn")
            pending += 1
        for key, _ in sel.select(0.05):
            if key.data != "conn":
                continue
            sock = key.fileobj  # type: ignore[assignment]
            sel.unregister(sock)
            pending -= 1
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                done.append(sock)
            else:
                sock.close()
                failed += 1
        _write_status(status, {"connected": len(done), "failed": failed, "pending": pending})
    _write_status(
        status, {"connected": len(done), "failed": failed, "pending": pending, "done": True}
    )
    hold_until = time.monotonic() + HOLD_LIMIT_S
    while time.monotonic() < hold_until and not _stdin_closed(sel, 1.0):
        pass


def slow_server(port: int, rate: int, seconds: float) -> None:
    """Accept one connection and read from it at about `rate` bytes/s for `seconds`."""
    listener = socket.create_server((HOST, port))
    listener.settimeout(10.0)
    conn, _addr = listener.accept()
    conn.settimeout(0.5)
    chunk = max(1, rate // 100)
    got = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        with contextlib.suppress(TimeoutError):
            data = conn.recv(chunk)
            if not data:
                break
            got += len(data)
        time.sleep(0.01)
    print(json.dumps({"read_bytes": got}), flush=True)


def blast(port: int, seconds: float, max_bytes: int) -> None:
    """Send zeros to `port` as fast as the path accepts, for `seconds` or `max_bytes`."""
    sock = socket.create_connection((HOST, port), timeout=10.0)
    sock.settimeout(0.2)
    block = b"\0" * 65536
    sent = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end and sent < max_bytes:
        with contextlib.suppress(TimeoutError):
            sent += sock.send(block)
    print(json.dumps({"sent_bytes": sent}), flush=True)
    sock.close()


def dns_query(qid: int, name: str = "www.bench.test") -> bytes:
    """A minimal DNS query for `name` IN A."""
    header = struct.pack("!HHHHHH", qid & 0xFFFF, 0x0100, 1, 0, 0, 0)
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split("."))
    return header + labels + b"\0" + struct.pack("!HH", 1, 1)


def udp_churn(port: int, seconds: float, max_queries: int, parallel: int) -> None:
    """Send each DNS query from a fresh UDP socket (new source port), `parallel` at a time."""
    sel = selectors.DefaultSelector()
    sent = answered = lost = 0
    start = time.monotonic()
    end = start + seconds
    inflight: dict[socket.socket, float] = {}
    while time.monotonic() < end or inflight:
        now = time.monotonic()
        while now < end and sent < max_queries and len(inflight) < parallel:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setblocking(False)
            sock.sendto(dns_query(sent), (HOST, port))
            sel.register(sock, selectors.EVENT_READ)
            inflight[sock] = now + 1.0
            sent += 1
        if sent >= max_queries and not inflight:
            break
        for key, _ in sel.select(0.05):
            sock = key.fileobj  # type: ignore[assignment]
            with contextlib.suppress(OSError):
                sock.recv(4096)
                answered += 1
            sel.unregister(sock)
            del inflight[sock]
            sock.close()
        for sock in [s for s, t in inflight.items() if t < time.monotonic()]:
            sel.unregister(sock)
            del inflight[sock]
            sock.close()
            lost += 1
        if time.monotonic() > end + 2.0:
            break
    elapsed = time.monotonic() - start
    print(
        json.dumps(
            {
                "sent": sent,
                "answered": answered,
                "lost": lost,
                "seconds": elapsed,
                "qps": answered / elapsed,
            }
        ),
        flush=True,
    )


def main(argv: list[str]) -> None:
    _raise_nofile()
    role, args = argv[0], argv[1:]
    if role == "hold-server":
        hold_server(int(args[0]), Path(args[1]))
    elif role == "hold-client":
        hold_client(int(args[0]), int(args[1]), Path(args[2]), Path(args[3]))
    elif role == "slow-server":
        slow_server(int(args[0]), int(args[1]), float(args[2]))
    elif role == "blast":
        blast(int(args[0]), float(args[1]), int(args[2]))
    elif role == "udp-churn":
        udp_churn(int(args[0]), float(args[1]), int(args[2]), int(args[3]))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
