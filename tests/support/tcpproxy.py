"""A TCP forwarder on loopback that can cut the network: for tests whose client holds one long connection (an
RTSP stream over TCP), where :mod:`tests.support.proxy` (HTTP requests) does not fit."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``host:target_port``. ``cut(down_for=s)`` closes every open connection and
    refuses new ones (accepted, then closed at once, as a dead link looks) for ``s`` seconds."""

    def __init__(self, host: str, target_port: int) -> None:
        self.target = (host, target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.accepted = 0  # connections forwarded
        self.refused = 0  # connections refused while the link was down
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._closed = False
        self._thread = threading.Thread(target=self._accept, name="tcpproxy", daemon=True)

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._closed = True
        self.listener.close()
        self.cut()

    def cut(self, *, down_for: float = 0.0) -> None:
        """Close every forwarded connection now; refuse new ones for ``down_for`` seconds."""
        with self._lock:
            self._down_until = time.monotonic() + down_for
            socks, self._open = self._open, []
        for s in socks:
            _close(s)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if time.monotonic() < self._down_until:
                self.refused += 1
                _close(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    _close(src)
    _close(dst)


def _close(s: socket.socket) -> None:
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)
    s.close()
