"""Port-forward in the demo cluster: the API server's side of the two WebSocket protocols,
to 127.0.0.1:PORT on this machine (the demo's pods are processes here).

* ``SPDY/3.1+portforward.k8s.io``: what kubectl 1.31+ speaks. The WebSocket's binary
  messages carry a SPDY/3.1 byte stream (bastion/demo/spdy.py). For every local
  connection kubectl opens two streams with the same ``requestid`` header: ``streamtype:
  error`` and ``streamtype: data``, each with the ``port``. The server replies to each,
  connects the data stream to the port, and closes the error stream when the connection
  ends, after writing a message on it if the connection failed (the kubelet's
  pkg/kubelet/cri/streaming/portforward/httpstream.go does the same).
* ``v4.channel.k8s.io``: the plain channel protocol (data channel 2i, error channel 2i+1,
  each opened by a frame carrying the port), one connection per port for the whole
  WebSocket.

A malformed frame or a frame for a stream that was never opened ends the tunnel, with
one line in the log and in the WebSocket's close reason; never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from dataclasses import dataclass, field

from aiohttp import WSCloseCode, WSMsgType, web

from bastion.doors.kube import spdy

log = logging.getLogger("guarita.demo")

V4 = "v4.channel.k8s.io"
SPDY_TUNNEL = "SPDY/3.1+portforward.k8s.io"
PROTOCOLS = (SPDY_TUNNEL, V4)
CHUNK = 32 * 1024
CONNECT_TIMEOUT = 10.0


async def serve(request: web.Request, pod: str) -> web.WebSocketResponse:
    """Upgrades ``request`` and forwards until the client goes; ``pod`` is ``ns/name``."""
    ws = web.WebSocketResponse(protocols=PROTOCOLS, max_msg_size=0, compress=False)
    await ws.prepare(request)
    if ws.ws_protocol == SPDY_TUNNEL:
        await SpdyPortForward(ws, pod).run()
    else:
        ports = [int(p) for v in request.query.getall("ports", []) for p in v.split(",") if p.strip()]
        await _v4(ws, ports)
    return ws


# ---------------------------------------------------------------------------------------
# v4.channel.k8s.io
# ---------------------------------------------------------------------------------------


async def _v4(ws: web.WebSocketResponse, ports: list[int]) -> None:
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for i, port in enumerate(ports):
        for ch in (2 * i, 2 * i + 1):
            await ws.send_bytes(bytes([ch]) + struct.pack("<H", port))
        conns.append(await asyncio.open_connection("127.0.0.1", port))

    async def pump(i: int, reader: asyncio.StreamReader) -> None:
        while data := await reader.read(65536):
            await ws.send_bytes(bytes([2 * i]) + data)

    tasks = [asyncio.create_task(pump(i, r)) for i, (r, _) in enumerate(conns)]
    try:
        async for msg in ws:
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            ch, data = msg.data[0], msg.data[1:]
            if ch % 2 == 0 and ch // 2 < len(conns):
                writer = conns[ch // 2][1]
                writer.write(data)
                await writer.drain()
    finally:
        for t in tasks:
            t.cancel()
        for _, w in conns:
            w.close()


# ---------------------------------------------------------------------------------------
# SPDY/3.1 tunnelled in the WebSocket
# ---------------------------------------------------------------------------------------


class TunnelEnded(Exception):
    """The client broke the protocol; the message says how, in one line."""


@dataclass
class _Pair:
    """One forwarded connection: its error and data streams and the TCP connection."""

    request_id: str
    port: int
    error: int = 0  # stream ids, 0 until opened
    data: int = 0
    writer: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    error_closed: bool = False  # we sent FIN on the error stream
    data_closed: bool = False  # we sent FIN on the data stream
    client_done: bool = False  # the client finished (FIN) or reset the data stream
    pending: list[bytes] = field(default_factory=list)  # data that came before the connection


class SpdyPortForward:
    def __init__(self, ws: web.WebSocketResponse, pod: str) -> None:
        self.ws, self.pod = ws, pod
        self.reader = spdy.FrameReader()
        self.writer = spdy.FrameWriter()
        self._send_lock = asyncio.Lock()  # frames leave in the order they were encoded
        self.pairs: dict[str, _Pair] = {}
        self.streams: dict[int, _Pair] = {}
        self.last_stream = 0  # the client's stream ids only grow: at or below this, a closed stream
        self.going_away = False
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        try:
            await self._frames()
        except TunnelEnded as exc:
            await self._protocol_error(str(exc))
        except spdy.SpdyError as exc:
            await self._protocol_error(f"malformed SPDY: {exc}")
        except ConnectionError as exc:
            log.info("demo cluster: port-forward to pod %s: the client went away (%s)", self.pod, exc)
        finally:
            await self._close_all()

    async def _frames(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                raise TunnelEnded("a text message in a SPDY tunnel (the stream is binary)")
            if msg.type != WSMsgType.BINARY:
                break
            for frame in self.reader.feed(msg.data):
                await self._handle(frame)
                if self.going_away:
                    return

    async def _protocol_error(self, message: str) -> None:
        log.warning("demo cluster: port-forward to pod %s ended: %s", self.pod, message)
        with contextlib.suppress(Exception):
            await self._send(spdy.GoAway(self.last_stream, spdy.GOAWAY_PROTOCOL_ERROR))
        with contextlib.suppress(Exception):
            await self.ws.close(code=WSCloseCode.PROTOCOL_ERROR, message=message.encode()[:120])

    async def _send(self, *frames: spdy.Frame) -> None:
        async with self._send_lock:
            await self.ws.send_bytes(b"".join(self.writer.encode(f) for f in frames))

    # -- frames from the client -----------------------------------------------------------

    async def _handle(self, frame: spdy.Frame) -> None:
        if isinstance(frame, spdy.SynStream):
            await self._open(frame)
        elif isinstance(frame, spdy.DataFrame):
            await self._data(frame)
        elif isinstance(frame, spdy.RstStream):
            pair = self._known(frame.stream_id, "RST_STREAM")
            if pair is not None:
                await self._client_reset(pair, frame.stream_id)
        elif isinstance(frame, spdy.Ping):
            await self._send(frame)  # the reply is the same frame
        elif isinstance(frame, spdy.GoAway):
            self.going_away = True
        elif isinstance(frame, spdy.SynReply):
            raise TunnelEnded(f"SYN_REPLY for stream {frame.stream_id}, which the server never opened")
        elif isinstance(frame, spdy.HeadersFrame):
            self._known(frame.stream_id, "HEADERS")
        # SETTINGS and WINDOW_UPDATE: kubectl does not use flow control; nothing to do.

    def _known(self, stream_id: int, what: str) -> _Pair | None:
        """The pair of an open stream, None for one that was closed; a stream that was
        never opened ends the tunnel."""
        if stream_id % 2 == 0 or stream_id > self.last_stream:
            raise TunnelEnded(f"{what} for stream {stream_id}, which was never opened")
        return self.streams.get(stream_id)

    async def _open(self, frame: spdy.SynStream) -> None:
        sid = frame.stream_id
        if sid % 2 == 0 or sid <= self.last_stream:
            raise TunnelEnded(f"SYN_STREAM for stream {sid}: client stream ids must be odd and grow "
                              f"(the last was {self.last_stream})")
        self.last_stream = sid
        kind, port, request_id, problem = _stream_headers(frame)
        pair = self.pairs.get(request_id) if not problem else None
        if not problem and pair is not None and (pair.port != port or getattr(pair, kind)):
            problem = f"a second {kind} stream for request {request_id}"
        if problem:
            log.warning("demo cluster: port-forward to pod %s: stream %d refused: %s", self.pod, sid, problem)
            await self._send(spdy.RstStream(sid, spdy.REFUSED_STREAM))
            return
        if pair is None:
            pair = self.pairs[request_id] = _Pair(request_id, port)
        setattr(pair, kind, sid)
        self.streams[sid] = pair
        await self._send(spdy.SynReply(sid))
        if pair.error and pair.data:
            pair.task = asyncio.create_task(self._forward(pair))
            self.tasks.add(pair.task)

    async def _data(self, frame: spdy.DataFrame) -> None:
        pair = self._known(frame.stream_id, "DATA")
        if pair is None or frame.stream_id != pair.data:
            return  # a closed stream, or the error stream (nothing is read from it)
        if frame.data:
            if pair.writer is None:
                pair.pending.append(frame.data)
            else:
                pair.writer.write(frame.data)
                await pair.writer.drain()
        if frame.fin:
            pair.client_done = True
            if pair.writer is not None and pair.writer.can_write_eof():
                pair.writer.write_eof()

    async def _client_reset(self, pair: _Pair, stream_id: int) -> None:
        if stream_id == pair.data:
            pair.client_done = True
            await self._finish(pair, reset=True)
        else:
            self._forget(pair, stream_id)

    # -- one forwarded connection ---------------------------------------------------------

    async def _forward(self, pair: _Pair) -> None:
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                reader, pair.writer = await asyncio.open_connection("127.0.0.1", pair.port)
        except (OSError, TimeoutError) as exc:
            reason = os.strerror(exc.errno).lower() if exc.errno else "timed out"
            message = f"error forwarding port {pair.port} to pod {self.pod}: dial tcp4 127.0.0.1:{pair.port}: {reason}"
            log.info("demo cluster: %s", message)
            await self._send(spdy.DataFrame(pair.error, message.encode()))
            await self._finish(pair)
            return
        for chunk in pair.pending:
            pair.writer.write(chunk)
        pair.pending.clear()
        if pair.client_done:
            pair.writer.write_eof()
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(CHUNK):
                await self._send(spdy.DataFrame(pair.data, data))
        await self._finish(pair)

    async def _finish(self, pair: _Pair, reset: bool = False) -> None:
        """The pod's side ended (or the client reset the data stream): FIN both streams
        (kubectl reads the error stream to its end before it lets go of the connection)."""
        frames: list[spdy.Frame] = []
        if not pair.data_closed and not reset:
            frames.append(spdy.DataFrame(pair.data, fin=True))
        if not pair.error_closed:
            frames.append(spdy.DataFrame(pair.error, fin=True))
        pair.data_closed = pair.error_closed = True
        if reset:
            self._drop(pair)
        with contextlib.suppress(ConnectionError, RuntimeError):
            if frames:
                await self._send(*frames)
        if pair.client_done:
            self._drop(pair)

    def _drop(self, pair: _Pair) -> None:
        if pair.task is not None and pair.task is not asyncio.current_task():
            pair.task.cancel()
        if pair.writer is not None:
            pair.writer.close()
        for sid in (pair.error, pair.data):
            self.streams.pop(sid, None)
        self.pairs.pop(pair.request_id, None)

    def _forget(self, pair: _Pair, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        if stream_id == pair.error:
            pair.error_closed = True

    async def _close_all(self) -> None:
        for pair in list(self.pairs.values()):
            self._drop(pair)
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _stream_headers(frame: spdy.SynStream) -> tuple[str, int, str, str]:
    """(kind, port, request id, problem): a non-empty problem refuses the stream."""
    def one(name: str) -> str:
        values = frame.headers.get(name) or [""]
        return values[0]

    kind, port_text, request_id = one("streamtype"), one("port"), one("requestid")
    if kind not in ("error", "data"):
        return kind, 0, request_id, f"streamtype {kind!r} (expected 'error' or 'data')"
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        return kind, 0, request_id, f"port {port_text!r} is not a port number"
    if not request_id:  # an old client: the kubelet pairs streams by id (error n, data n+2)
        request_id = str(frame.stream_id if kind == "error" else frame.stream_id - 2)
    return kind, int(port_text), request_id, ""
