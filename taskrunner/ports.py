"""Local TCP ports: is one free to listen on, and pick a free one."""

from __future__ import annotations

import socket


def port_is_free(port: int) -> bool:
    """True if 127.0.0.1:``port`` can be bound (as a server binds it, with SO_REUSEADDR)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        # as servers bind: connections of a just-stopped server linger in TIME_WAIT, and
        # without this a restarted one (the embedded cluster) would move to another port
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_free_port(avoid: int | None = None) -> int:
    """A port the kernel says is free on 127.0.0.1 now (never ``avoid``)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port != avoid:
            return port
