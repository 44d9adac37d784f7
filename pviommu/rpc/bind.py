"""Say clearly, before anything is set up, that a service cannot listen where asked.

gRPC reports a failed bind as ``RuntimeError("Failed to bind to address
...")`` after a C-core log line, and only once the service has already made
its bank files and sockets. ``bind_problem`` tries the address with a plain
socket first, so a service can refuse with one line ("127.0.0.1:50051 is
already in use") and leave nothing behind. The gRPC bind stays the
authority: a service still cleans up when it fails after this check.
"""

from __future__ import annotations

import errno
import socket


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` / ``[v6]:port`` -> (host, port); ValueError when malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"{address!r} is not host:port")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    n = int(port)
    if n > 65535:
        raise ValueError(f"{address!r}: port {n} is above 65535")
    return host or "0.0.0.0", n


def bind_problem(address: str) -> str | None:
    """Why a server could not listen on ``address`` (None when it can)."""
    try:
        host, port = split_address(address)
    except ValueError as exc:
        return str(exc)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"cannot listen on {address}: the host name does not resolve ({exc.strerror})"
    if port == 0:
        return None
    family, kind, proto, _, sockaddr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(sockaddr)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return f"cannot listen on {address}: the port is already in use"
            if exc.errno == errno.EACCES:
                return f"cannot listen on {address}: permission denied (ports below 1024 need privileges)"
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"cannot listen on {address}: no local interface has that address"
            return f"cannot listen on {address}: {exc.strerror}"
    return None


class BindError(OSError):
    """A service cannot listen where asked (the message says why, in one line)."""
