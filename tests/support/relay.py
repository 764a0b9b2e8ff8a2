"""A TCP relay on loopback that stalls one direction: a slow or congested link.

``ThrottledRelay(target_port, every=16384, stall=0.02)`` listens on a free loopback port
and forwards every connection to ``target_port``. Bytes from the target to the client stop
for ``stall`` seconds after each ``every`` bytes (a link that stalls 20 ms every 16 KiB);
bytes the other way pass at once. Threads, no event loop: it works beside any test.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class ThrottledRelay:
    def __init__(self, target_port: int, every: int = 16384, stall: float = 0.02) -> None:
        self.target_port = target_port
        self.every = every
        self.stall = stall
        self.stalls = 0  # how many times the link stalled
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closing = False
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> ThrottledRelay:
        self._spawn(self._accept)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._closing = True
        with contextlib.suppress(OSError):
            self._listener.close()
        for s in list(self._socks):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()
        for t in self._threads:
            t.join(timeout=5)

    def _spawn(self, fn: object, *args: object) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)  # type: ignore[arg-type]
        self._threads.append(t)
        t.start()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            self._socks += [client, upstream]
            self._spawn(self._pump, client, upstream, False)
            self._spawn(self._pump, upstream, client, True)

    def _pump(self, src: socket.socket, dst: socket.socket, throttled: bool) -> None:
        sent = 0
        try:
            while True:
                # Read no further than the next stall point, so the stall falls exactly there.
                room = self.every - sent % self.every if throttled else 65536
                data = src.recv(min(65536, room))
                if not data:
                    break
                dst.sendall(data)
                before, sent = sent, sent + len(data)
                if throttled and sent // self.every > before // self.every:
                    self.stalls += 1
                    time.sleep(self.stall)  # the link stalls: this is the condition under test
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
