"""
The udp_dns ceiling experiment's Python floor: goma-pt's shape (a socket
connected to the target per client address, epoll) in plain Python, with
nothing else (no Twisted, no stats, no timeouts, sessions never end): what
the interpreter's socket calls alone cost per query.

    python pyfloor.py LISTEN_PORT TARGET_PORT     (127.0.0.1 both sides)
"""

from __future__ import annotations

import select
import signal
import socket
import sys

READS = 64  # datagrams read per readiness event at most, as goma-pt


def main() -> None:
    listen_port, target_port = int(sys.argv[1]), int(sys.argv[2])
    target = ("127.0.0.1", target_port)
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.setblocking(False)
    listener.bind(("127.0.0.1", listen_port))
    poller = select.epoll()
    listen_fd = listener.fileno()
    poller.register(listen_fd, select.EPOLLIN)
    sessions: dict[tuple[str, int], socket.socket] = {}
    by_fd: dict[int, tuple[socket.socket, tuple[str, int]]] = {}
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(1))
    recvfrom, sendto = listener.recvfrom, listener.sendto
    session_type = socket.SOCK_DGRAM | socket.SOCK_NONBLOCK
    while not stopping:
        try:
            events = poller.poll(1.0)
        except InterruptedError:
            continue
        for fd, _ in events:
            if fd == listen_fd:
                for _ in range(READS):
                    try:
                        data, addr = recvfrom(65535)
                    except BlockingIOError:
                        break
                    skt = sessions.get(addr)
                    if skt is None:
                        skt = socket.socket(socket.AF_INET, session_type)
                        skt.connect(target)
                        sessions[addr] = skt
                        by_fd[skt.fileno()] = (skt, addr)
                        poller.register(skt.fileno(), select.EPOLLIN)
                    skt.send(data)
            else:
                skt, addr = by_fd[fd]
                recv = skt.recv
                for _ in range(READS):
                    try:
                        data = recv(65535)
                    except (BlockingIOError, ConnectionRefusedError):
                        break
                    sendto(data, addr)


if __name__ == "__main__":
    main()
