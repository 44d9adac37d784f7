"""Opening data-plane sessions: a Unix stream socket per service, one JSON
line in, one JSON line (plus file descriptors, SCM_RIGHTS) out, and the
connection kept open for the session's life -- its end (EOF, the client
died) closes the session, so nothing a client opens outlives it.

Request: ``{"token": "<bearer token>", "kind": "<kind>", ...}`` (at most
8 KiB, within 5 s of connecting). Reply: ``{"ok": true, "session": N,
...layout...}`` with the fds, or ``{"ok": false, "code": "<gRPC code name>",
"error": "<message>"}`` and the connection closed. The token is checked by
the service like a gRPC credential, so a session is handed only to the
credential's holder; a C client needs nothing but sockets (docs/transports.md).
"""

from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pviommu.log import get_logger
from pviommu.shm.region import Doorbell, Region

log = get_logger("shm.sessions")

MAX_REQUEST = 8192
HANDSHAKE_TIMEOUT_S = 5.0
MAX_FDS = 8


class SessionRefused(Exception):
    """An open request the service declines; ``code`` is a gRPC status code name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Opened:
    """What a service returns for an accepted request."""

    reply: dict[str, Any]
    fds: list[int]
    on_close: Callable[[], None]


Opener = Callable[[dict[str, Any]], Opened]


@dataclass
class _Conn:
    sock: socket.socket
    since: float
    buf: bytearray = field(default_factory=bytearray)
    opened: Opened | None = None


class SessionServer:
    """Serves ``opener`` on the Unix socket at ``path`` (one thread)."""

    def __init__(self, path: str, opener: Opener) -> None:
        self.path = path
        self._opener = opener
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self._listen = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listen.bind(path)
        os.chmod(path, 0o600)
        self._listen.listen(64)
        self._listen.setblocking(False)
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listen, selectors.EVENT_READ)
        self._conns: dict[int, _Conn] = {}
        self._stop = False
        self._wake_r, self._wake_w = os.pipe()
        self._sel.register(self._wake_r, selectors.EVENT_READ)
        self.sessions_opened = 0
        self._thread = threading.Thread(target=self._loop, name=f"sessions-{os.path.basename(path)}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            for key, _ in self._sel.select(timeout=0.5):
                if key.fileobj is self._listen:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    os.read(self._wake_r, 64)
                else:
                    self._readable(key.fileobj)  # type: ignore[arg-type]
            now = time.monotonic()
            for fd, c in list(self._conns.items()):
                if c.opened is None and now - c.since > HANDSHAKE_TIMEOUT_S:
                    self._drop(fd, "handshake timed out")

    def _accept(self) -> None:
        try:
            sock, _ = self._listen.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        self._conns[sock.fileno()] = _Conn(sock, time.monotonic())
        self._sel.register(sock, selectors.EVENT_READ)

    def _readable(self, sock: socket.socket) -> None:
        fd = sock.fileno()
        c = self._conns.get(fd)
        if c is None:
            return
        try:
            data = sock.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd, "client closed")
            return
        if c.opened is not None:
            return  # nothing more is expected on an open session: ignore
        c.buf += data
        if b"\n" not in c.buf:
            if len(c.buf) > MAX_REQUEST:
                self._refuse(fd, "INVALID_ARGUMENT", f"request longer than {MAX_REQUEST} bytes")
            return
        line = bytes(c.buf.split(b"\n", 1)[0])
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            self._refuse(fd, "INVALID_ARGUMENT", f"malformed session request: {exc}")
            return
        try:
            opened = self._opener(request)
        except SessionRefused as exc:
            self._refuse(fd, exc.code, str(exc))
            return
        except Exception as exc:  # a bug: say so, keep serving
            log.exception("session.open_failed")
            self._refuse(fd, "INTERNAL", f"{type(exc).__name__}: {exc}")
            return
        payload = (json.dumps({"ok": True, **opened.reply}) + "\n").encode()
        try:
            sock.setblocking(True)
            sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", opened.fds))])
            sock.setblocking(False)
        except OSError:
            opened.on_close()
            self._drop(fd, "reply failed")
            return
        c.opened = opened
        self.sessions_opened += 1

    def _refuse(self, fd: int, code: str, message: str) -> None:
        c = self._conns.get(fd)
        if c is not None:
            with contextlib.suppress(OSError):
                c.sock.setblocking(True)
                c.sock.sendall((json.dumps({"ok": False, "code": code, "error": message}) + "\n").encode())
        self._drop(fd, message)

    def _drop(self, fd: int, why: str) -> None:
        c = self._conns.pop(fd, None)
        if c is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self._sel.unregister(c.sock)
        c.sock.close()
        if c.opened is not None:
            try:
                c.opened.on_close()
            except Exception:
                log.exception("session.close_failed")

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        for fd in list(self._conns):
            self._drop(fd, "server closed")
        self._sel.close()
        self._listen.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


class SessionError(Exception):
    """The service refused the session (``code``: a gRPC status code name)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code


def open_session(path: str, request: dict[str, Any], timeout: float = 10.0) -> tuple[dict[str, Any], list[int],
                                                                                   socket.socket]:
    """Send ``request`` to the service at ``path``; returns its reply, the fds
    and the socket to keep open for the session's life (close it to end it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
        sock.sendall((json.dumps(request) + "\n").encode())
        fds = array.array("i")
        buf = b""
        while b"\n" not in buf:
            data, ancdata, _, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * fds.itemsize))
            for level, kind, payload in ancdata:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
            if not data:
                raise SessionError("UNAVAILABLE", f"{path} closed the connection")
            buf += data
        reply = json.loads(buf.split(b"\n", 1)[0])
    except BaseException:
        sock.close()
        raise
    if not reply.get("ok"):
        sock.close()
        for fd in fds:
            os.close(fd)
        raise SessionError(str(reply.get("code", "UNKNOWN")), str(reply.get("error", "refused")))
    sock.settimeout(None)
    return reply, list(fds), sock


@dataclass
class RegionSession:
    """An open session of a region-backed kind: its reply, the shared region (the first fd),
    a doorbell per further fd, and the socket whose end ends the session."""

    reply: dict[str, Any]
    region: Region
    doorbells: list[Doorbell]
    sock: socket.socket

    @property
    def session(self) -> int:
        return int(self.reply["session"])

    def close(self) -> None:
        """End the session and drop what it handed over (a client that could not use it)."""
        self.sock.close()
        self.region.close()
        for bell in self.doorbells:
            bell.close()


def open_region_session(path: str, request: dict[str, Any], *, doorbells: int,
                        timeout: float = 10.0) -> RegionSession:
    """``open_session`` for the kinds that hand out a region and ``doorbells`` doorbells (portals,
    interrupt pages, fault rings, hypercall pages): a reply of another kind or fd count, or a
    region that does not map, closes everything and raises ``SessionError("PROTOCOL_ERROR")``."""
    reply, fds, sock = open_session(path, request, timeout=timeout)
    try:
        if reply.get("kind") != request.get("kind") or len(fds) != 1 + doorbells:
            raise SessionError("PROTOCOL_ERROR", f"unexpected reply {reply!r} with {len(fds)} fds")
        try:
            region = Region(fds[0], int(reply["bytes"]))
        except (KeyError, ValueError, OSError) as exc:
            raise SessionError("PROTOCOL_ERROR", f"the session's region does not map: {exc}") from exc
    except BaseException:
        sock.close()
        for fd in fds:
            os.close(fd)
        raise
    return RegionSession(reply, region, [Doorbell(fd) for fd in fds[1:]], sock)


def peer_alive(sock: socket.socket) -> bool:
    """False once the service at the other end of a session socket is gone
    (one MSG_PEEK, never blocking: the clients poll it between ring checks)."""
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) != b""
    except BlockingIOError:
        return True
    except (OSError, ValueError):
        return False
