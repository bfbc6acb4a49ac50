"""A loopback TCP proxy that can be broken (connections refused and cut) or slowed: chaos experiments put it in
front of a store to make an outage or a slow store on purpose."""

from __future__ import annotations

import socket
import threading
import time

__all__ = ["BreakableProxy"]


class BreakableProxy:
    """Listens on 127.0.0.1 (a free port) and forwards to ``target_host:target_port``.

    ``set_broken(True)``: new connections are refused and open ones cut, until ``set_broken(False)``.
    ``set_delay(s)``: every forwarded chunk waits ``s`` seconds first (a slow store).
    """

    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.broken = False
        self.delay_s = 0.0
        self.refused = 0
        self.conns: list = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            if self.broken:
                self.refused += 1
                client.close()
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            self.conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, a, b) -> None:
        try:
            while True:
                data = a.recv(65536)
                if not data or self.broken:
                    break
                if self.delay_s:
                    time.sleep(self.delay_s)
                b.sendall(data)
        except OSError:
            pass
        finally:
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def set_broken(self, broken: bool) -> None:
        self.broken = broken
        if broken:
            for c in self.conns:
                try:
                    # shutdown first: close() alone does not wake a thread blocked in recv() on it, and the
                    # connection would stay open (a client waiting for an answer would wait forever)
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                try:
                    c.close()
                except OSError:
                    pass
            self.conns = []

    def set_delay(self, seconds: float) -> None:
        self.delay_s = max(0.0, float(seconds))

    def close(self) -> None:
        self._closed = True
        self.set_broken(True)
        self.sock.close()
