"""SPDY/3.1 framing: the part of it that Kubernetes port-forward uses.

kubectl 1.31+ does ``port-forward`` by tunnelling SPDY/3.1 inside a WebSocket whose
subprotocol is ``SPDY/3.1+portforward.k8s.io`` (client-go tools/portforward, the
moby/spdystream framer). The demo cluster speaks the server side of it
(bastion/demo/portforward.py). guarita's front door relays the tunnel as it is, and
only reads the client's control frames as they pass (``ControlScanner``), to audit
which ports the tunnel opened.

Frames (draft-mbelshe-httpbis-spdy-00, SPDY/3): a control frame is
``1 | version(15) | type(16) | flags(8) | length(24) | payload``, a data frame is
``0 | stream-id(31) | flags(8) | length(24) | data``. Header blocks (SYN_STREAM,
SYN_REPLY, HEADERS) are zlib-compressed with the SPDY/3 dictionary, and the compression
context lives as long as the connection, one per direction: a block can only be read
after every block before it, which is why one ``FrameReader`` reads a connection's
frames in order and one ``FrameWriter`` writes them.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

VERSION = 3
SYN_STREAM, SYN_REPLY, RST_STREAM, SETTINGS, PING, GOAWAY, HEADERS, WINDOW_UPDATE = 1, 2, 3, 4, 6, 7, 8, 9
FLAG_FIN = 0x01
# RST_STREAM status codes (the ones this code sends).
PROTOCOL_ERROR, INVALID_STREAM, REFUSED_STREAM, CANCEL, INTERNAL_ERROR = 1, 2, 3, 5, 6
GOAWAY_OK, GOAWAY_PROTOCOL_ERROR = 0, 1
MAX_LENGTH = (1 << 24) - 1
# A header block bigger than this, once decompressed, is refused: port-forward's are ~60
# bytes, and a small compressed block must not be able to ask for megabytes.
MAX_HEADER_BLOCK = 64 * 1024
_NAMES = {SYN_STREAM: "SYN_STREAM", SYN_REPLY: "SYN_REPLY", RST_STREAM: "RST_STREAM", SETTINGS: "SETTINGS",
          PING: "PING", GOAWAY: "GOAWAY", HEADERS: "HEADERS", WINDOW_UPDATE: "WINDOW_UPDATE"}

# The SPDY/3 header compression dictionary: these names, each with a 4-byte big-endian
# length before it, then this text (the spec's table; zlib checks it by its Adler-32,
# 0xe3c6a7c2, which tests/test_spdy.py pins).
_DICTIONARY_WORDS = (
    "options head post put delete trace accept accept-charset accept-encoding accept-language accept-ranges "
    "age allow authorization cache-control connection content-base content-encoding content-language "
    "content-length content-location content-md5 content-range content-type date etag expect expires from "
    "host if-match if-modified-since if-none-match if-range if-unmodified-since last-modified location "
    "max-forwards pragma proxy-authenticate proxy-authorization range referer retry-after server te trailer "
    "transfer-encoding upgrade user-agent vary via warning www-authenticate method get status"
).split() + ["200 OK", "version", "HTTP/1.1", "url", "public", "set-cookie", "keep-alive", "origin"]
_DICTIONARY_TAIL = (
    "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505"
    "203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized"
    "403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable"
    "Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT"
    "chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,"
    "text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0."
)
DICTIONARY = b"".join(struct.pack(">I", len(w)) + w.encode() for w in _DICTIONARY_WORDS) + _DICTIONARY_TAIL.encode()

Headers = dict[str, list[str]]


class SpdyError(Exception):
    """A frame this side cannot accept; the message is one line, fit for a log."""


@dataclass(frozen=True)
class DataFrame:
    stream_id: int
    data: bytes = b""
    fin: bool = False


@dataclass(frozen=True)
class SynStream:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    fin: bool = False
    associated_to: int = 0
    priority: int = 0


@dataclass(frozen=True)
class SynReply:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class HeadersFrame:
    stream_id: int
    headers: Headers = field(default_factory=dict)
    fin: bool = False


@dataclass(frozen=True)
class RstStream:
    stream_id: int
    status: int


@dataclass(frozen=True)
class Settings:
    values: tuple[tuple[int, int, int], ...] = ()  # (flags, id, value)


@dataclass(frozen=True)
class Ping:
    ping_id: int


@dataclass(frozen=True)
class GoAway:
    last_good_stream_id: int
    status: int = GOAWAY_OK


@dataclass(frozen=True)
class WindowUpdate:
    stream_id: int
    delta: int


Frame = DataFrame | SynStream | SynReply | HeadersFrame | RstStream | Settings | Ping | GoAway | WindowUpdate


def frame_name(kind: int) -> str:
    return _NAMES.get(kind, f"type {kind}")


# ---------------------------------------------------------------------------------------
# header blocks
# ---------------------------------------------------------------------------------------


def encode_header_block(headers: Headers) -> bytes:
    out = [struct.pack(">I", len(headers))]
    for name, values in headers.items():
        raw_name, raw_value = name.lower().encode(), "\x00".join(values).encode()
        out += [struct.pack(">I", len(raw_name)), raw_name, struct.pack(">I", len(raw_value)), raw_value]
    return b"".join(out)


def decode_header_block(block: bytes) -> Headers:
    """Names are lower-case on the wire; several values of one name are NUL-separated."""
    view = _Cursor(block, "header block")
    headers: Headers = {}
    for _ in range(view.u32()):
        name = view.take(view.u32()).decode("utf-8", "replace")
        value = view.take(view.u32()).decode("utf-8", "replace")
        if not name:
            raise SpdyError("header block: an empty header name")
        if name in headers:
            raise SpdyError(f"header block: header {name!r} twice")
        headers[name] = value.split("\x00")
    if view.left:
        raise SpdyError(f"header block: {view.left} bytes after the last header")
    return headers


class _Cursor:
    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    @property
    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        if n > self.left:
            raise SpdyError(f"{self.what}: truncated (wanted {n} bytes, {self.left} left)")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u32(self) -> int:
        value: int = struct.unpack(">I", self.take(4))[0]
        return value


# ---------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------


class FrameReader:
    """Frames out of a byte stream that arrives in pieces of any size (WebSocket messages).

    ``feed`` returns the frames completed so far; it raises ``SpdyError`` on the first
    malformed one, after which the connection is unusable (its compression context is)."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._inflate = zlib.decompressobj(zdict=DICTIONARY)

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame held until the rest arrives."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[Frame]:
        self._buffer += data
        frames: list[Frame] = []
        while len(self._buffer) >= 8:
            length = int.from_bytes(self._buffer[5:8], "big")
            if len(self._buffer) < 8 + length:
                break
            head, payload = bytes(self._buffer[:8]), bytes(self._buffer[8:8 + length])
            del self._buffer[:8 + length]
            frame = self._parse(head, payload)
            if frame is not None:
                frames.append(frame)
        return frames

    def _parse(self, head: bytes, payload: bytes) -> Frame | None:
        first, flags = struct.unpack(">I", head[:4])[0], head[4]
        if not first & 0x80000000:
            stream_id = first & 0x7FFFFFFF
            if stream_id == 0:
                raise SpdyError("DATA frame for stream 0")
            return DataFrame(stream_id, payload, bool(flags & FLAG_FIN))
        version, kind = (first >> 16) & 0x7FFF, first & 0xFFFF
        if version != VERSION:
            raise SpdyError(f"{frame_name(kind)} frame of SPDY version {version} (this side speaks SPDY/3.1)")
        parse = _CONTROL.get(kind)
        if parse is None:
            return None  # the spec: an unknown control frame type is ignored
        return parse(self, flags, _Cursor(payload, f"{frame_name(kind)} frame"))

    def headers(self, view: _Cursor) -> Headers:
        compressed = view.take(view.left)
        try:
            block = self._inflate.decompress(compressed, MAX_HEADER_BLOCK + 1)
        except zlib.error as exc:
            raise SpdyError(f"header block does not decompress ({exc})") from None
        if len(block) > MAX_HEADER_BLOCK or self._inflate.unconsumed_tail:
            raise SpdyError(f"header block larger than {MAX_HEADER_BLOCK} bytes")
        return decode_header_block(block)

    def _syn_stream(self, flags: int, view: _Cursor) -> SynStream:
        stream_id, associated = _stream_id(view), view.u32() & 0x7FFFFFFF
        priority = view.take(2)[0] >> 5
        return SynStream(stream_id, self.headers(view), bool(flags & FLAG_FIN), associated, priority)

    def _syn_reply(self, flags: int, view: _Cursor) -> SynReply:
        stream_id = _stream_id(view)
        return SynReply(stream_id, self.headers(view), bool(flags & FLAG_FIN))

    def _headers(self, flags: int, view: _Cursor) -> HeadersFrame:
        stream_id = _stream_id(view)
        return HeadersFrame(stream_id, self.headers(view), bool(flags & FLAG_FIN))

    def _rst_stream(self, flags: int, view: _Cursor) -> RstStream:
        stream_id, status = _stream_id(view), view.u32()
        _exact(view)
        if status == 0:
            raise SpdyError(f"RST_STREAM frame for stream {stream_id} with status 0")
        return RstStream(stream_id, status)

    def _settings(self, flags: int, view: _Cursor) -> Settings:
        count = view.u32()
        if count * 8 != view.left:
            raise SpdyError(f"SETTINGS frame: {count} entries do not fill {view.left} bytes")
        values = []
        for _ in range(count):
            word = view.u32()
            values.append((word >> 24, word & 0xFFFFFF, view.u32()))
        return Settings(tuple(values))

    def _ping(self, flags: int, view: _Cursor) -> Ping:
        ping = Ping(view.u32())
        _exact(view)
        return ping

    def _goaway(self, flags: int, view: _Cursor) -> GoAway:
        frame = GoAway(view.u32() & 0x7FFFFFFF, view.u32())
        _exact(view)
        return frame

    def _window_update(self, flags: int, view: _Cursor) -> WindowUpdate:
        frame = WindowUpdate(view.u32() & 0x7FFFFFFF, view.u32() & 0x7FFFFFFF)
        _exact(view)
        return frame


def _stream_id(view: _Cursor) -> int:
    stream_id = view.u32() & 0x7FFFFFFF
    if stream_id == 0:
        raise SpdyError(f"{view.what} for stream 0")
    return stream_id


def _exact(view: _Cursor) -> None:
    if view.left:
        raise SpdyError(f"{view.what}: {view.left} bytes too many")


_CONTROL: dict[int, Callable[[FrameReader, int, _Cursor], Frame]] = {
    SYN_STREAM: FrameReader._syn_stream, SYN_REPLY: FrameReader._syn_reply, HEADERS: FrameReader._headers,
    RST_STREAM: FrameReader._rst_stream, SETTINGS: FrameReader._settings, PING: FrameReader._ping,
    GOAWAY: FrameReader._goaway, WINDOW_UPDATE: FrameReader._window_update}


class ControlScanner:
    """The control frames of a byte stream, with DATA payloads skipped as they pass, never
    copied or held: for a relay that must watch a tunnel at full speed without reading it.

    Control frames (a few dozen bytes each in port-forward) are parsed by a
    ``FrameReader``, so header blocks keep their compression context."""

    def __init__(self) -> None:
        self._reader = FrameReader()
        self._skip = 0  # DATA payload bytes still to pass over
        self._frame = bytearray()  # a control frame (or any frame's 8-byte head) so far

    def feed(self, data: bytes) -> list[Frame]:
        frames: list[Frame] = []
        pos, size = 0, len(data)
        while pos < size:
            if self._skip:
                step = min(self._skip, size - pos)
                self._skip -= step
                pos += step
                continue
            need = 8 if len(self._frame) < 8 else 8 + int.from_bytes(self._frame[5:8], "big")
            take = min(need - len(self._frame), size - pos)
            self._frame += data[pos:pos + take]
            pos += take
            if len(self._frame) == 8 and not self._frame[0] & 0x80:  # a DATA frame's head
                self._skip = int.from_bytes(self._frame[5:8], "big")
                self._frame.clear()
            elif len(self._frame) >= 8 and len(self._frame) == 8 + int.from_bytes(self._frame[5:8], "big"):
                frames += self._reader.feed(bytes(self._frame))
                self._frame.clear()
        return frames


# ---------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------


class FrameWriter:
    """Bytes of frames, in the order they go on the wire (header blocks share one zlib
    context, so frames must be sent in the order they were encoded)."""

    def __init__(self) -> None:
        self._deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=DICTIONARY)

    def encode(self, frame: Frame) -> bytes:
        if isinstance(frame, DataFrame):
            return self.data(frame.stream_id, frame.data, frame.fin)
        if isinstance(frame, SynStream):
            body = struct.pack(">IIBB", frame.stream_id, frame.associated_to, (frame.priority & 7) << 5, 0)
            return _control(SYN_STREAM, _fin(frame.fin), body + self._block(frame.headers))
        if isinstance(frame, SynReply | HeadersFrame):
            kind = SYN_REPLY if isinstance(frame, SynReply) else HEADERS
            return _control(kind, _fin(frame.fin), struct.pack(">I", frame.stream_id) + self._block(frame.headers))
        return _simple(frame)

    def data(self, stream_id: int, data: bytes = b"", fin: bool = False) -> bytes:
        if len(data) > MAX_LENGTH:
            raise ValueError(f"a DATA frame carries at most {MAX_LENGTH} bytes")
        return struct.pack(">II", stream_id & 0x7FFFFFFF, (_fin(fin) << 24) | len(data)) + data

    def _block(self, headers: Headers) -> bytes:
        return self._deflate.compress(encode_header_block(headers)) + self._deflate.flush(zlib.Z_SYNC_FLUSH)


def _simple(frame: Frame) -> bytes:
    """Frames without a header block (their encoding needs no compression context)."""
    if isinstance(frame, RstStream):
        return _control(RST_STREAM, 0, struct.pack(">II", frame.stream_id, frame.status))
    if isinstance(frame, Settings):
        body = struct.pack(">I", len(frame.values)) + b"".join(
            struct.pack(">II", (flags << 24) | ident, value) for flags, ident, value in frame.values)
        return _control(SETTINGS, 0, body)
    if isinstance(frame, Ping):
        return _control(PING, 0, struct.pack(">I", frame.ping_id))
    if isinstance(frame, GoAway):
        return _control(GOAWAY, 0, struct.pack(">II", frame.last_good_stream_id, frame.status))
    if isinstance(frame, WindowUpdate):
        return _control(WINDOW_UPDATE, 0, struct.pack(">II", frame.stream_id, frame.delta))
    raise TypeError(f"not a SPDY frame: {frame!r}")


def _fin(fin: bool) -> int:
    return FLAG_FIN if fin else 0


def _control(kind: int, flags: int, payload: bytes) -> bytes:
    if len(payload) > MAX_LENGTH:
        raise ValueError(f"a {frame_name(kind)} frame carries at most {MAX_LENGTH} bytes")
    return struct.pack(">HHI", 0x8000 | VERSION, kind, (flags << 24) | len(payload)) + payload
