"""A TCP forwarder on loopback that can cut the network: for tests whose client holds one long connection (an
RTSP stream over TCP), where :mod:`tests.support.proxy` (HTTP requests) does not fit. With several targets it is a
round-robin balancer, as a layer-4 load balancer in front of hub workers is: each new connection goes to the next
target that accepts one, so a dead target is passed over."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from types import TracebackType


class TcpProxy:
    """Forwards ``127.0.0.1:port`` to ``host:target_port``. ``cut(down_for=s)`` closes every open connection and
    refuses new ones (accepted, then closed at once, as a dead link looks) for ``s`` seconds."""

    def __init__(self, host: str, target_port: int, *more_ports: int) -> None:
        self.target = (host, target_port)
        self.targets = [(host, p) for p in (target_port, *more_ports)]
        self.per_target = [0] * len(self.targets)  # connections forwarded to each
        self._next = 0
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
            upstream = self._connect()
            if upstream is None:
                _close(client)
                continue
            upstream.settimeout(None)
            with self._lock:
                self._open += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()


    def _connect(self) -> socket.socket | None:
        """A connection to the next target in turn that takes one (None if none does)."""
        for _ in range(len(self.targets)):
            i, self._next = self._next, (self._next + 1) % len(self.targets)
            try:
                upstream = socket.create_connection(self.targets[i], timeout=5)
            except OSError:
                continue
            self.per_target[i] += 1
            return upstream
        return None


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
