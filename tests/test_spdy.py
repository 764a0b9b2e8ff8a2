"""SPDY/3.1 as kubectl's port-forward uses it: the framer (bastion/kube/spdy.py) and the
demo cluster's side of the tunnel (bastion/demo/portforward.py), spoken to by a client
built from the same framer over a real WebSocket. kubectl itself against it, through the
gateway: tests/test_kube_e2e.py."""

from __future__ import annotations

import asyncio
import logging
import os
import ssl
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from bastion.doors.kube import spdy
from tests.support.echo import echo_server
from tests.support.kubeapi import KubeAPIStandIn
from tests.support.openssh import free_port

pytestmark = pytest.mark.timeout(60)
TOKEN = "spdy-test-token"
TUNNEL = "SPDY/3.1+portforward.k8s.io"

FRAMES: list[spdy.Frame] = [
    spdy.SynStream(1, {"streamtype": ["error"], "port": ["8080"], "requestid": ["0"]}),
    spdy.SynStream(3, {"streamtype": ["data"], "port": ["8080"], "requestid": ["0"]}, priority=2),
    spdy.SynReply(1, {}),
    spdy.SynReply(3, {"x-several": ["a", "b"]}, fin=True),
    spdy.DataFrame(3, os.urandom(70_000)),
    spdy.DataFrame(3, b"", fin=True),
    spdy.HeadersFrame(3, {"trailer": ["done"]}, fin=True),
    spdy.RstStream(3, spdy.CANCEL),
    spdy.Settings(((0, 7, 65536), (1, 4, 100))),
    spdy.Ping(1),
    spdy.WindowUpdate(3, 4096),
    spdy.GoAway(3, spdy.GOAWAY_OK),
]


def _wire(frames: list[spdy.Frame]) -> bytes:
    writer = spdy.FrameWriter()
    return b"".join(writer.encode(f) for f in frames)


def _control(kind: int, payload: bytes, version: int = 3, flags: int = 0) -> bytes:
    return struct.pack(">HHI", 0x8000 | version, kind, (flags << 24) | len(payload)) + payload


# ---------------------------------------------------------------------------------------
# the framer
# ---------------------------------------------------------------------------------------


def test_the_dictionary_is_spdy3s() -> None:
    # zlib names a preset dictionary by its Adler-32: kubectl's (moby/spdystream) has this one.
    assert len(spdy.DICTIONARY) == 1423 and zlib.adler32(spdy.DICTIONARY) == 0xE3C6A7C2


@pytest.mark.parametrize("piece", [1, 7, 4096, 1 << 20])
def test_round_trip_in_pieces_of_any_size(piece: int) -> None:
    wire = _wire(FRAMES)
    reader = spdy.FrameReader()
    got: list[spdy.Frame] = []
    for i in range(0, len(wire), piece):
        got += reader.feed(wire[i:i + piece])
    assert got == FRAMES and reader.pending == 0


def test_header_blocks_share_one_compression_context_per_direction() -> None:
    headers = {"streamtype": ["data"], "port": ["5432"], "requestid": ["7"]}
    writer = spdy.FrameWriter()
    first, second = writer.encode(spdy.SynStream(1, headers)), writer.encode(spdy.SynStream(3, headers))
    assert len(second) < len(first)  # the second block refers back to the first
    reader = spdy.FrameReader()
    assert reader.feed(first + second) == [spdy.SynStream(1, headers), spdy.SynStream(3, headers)]
    with pytest.raises(spdy.SpdyError, match="header block does not decompress"):
        spdy.FrameReader().feed(second)  # without the first, the second cannot be read


def test_a_block_from_another_zlib_compressor_reads() -> None:
    """Only the dictionary is fixed: level and flush points are the writer's choice."""
    deflate = zlib.compressobj(1, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=spdy.DICTIONARY)
    block = spdy.encode_header_block({"streamtype": ["error"], "port": ["80"]})
    payload = struct.pack(">IIBB", 5, 0, 0, 0) + deflate.compress(block) + deflate.flush(zlib.Z_SYNC_FLUSH)
    assert spdy.FrameReader().feed(_control(spdy.SYN_STREAM, payload)) == [
        spdy.SynStream(5, {"streamtype": ["error"], "port": ["80"]})]


def test_unknown_control_frame_types_are_skipped() -> None:
    wire = _control(0x77, b"whatever") + _wire([spdy.Ping(3)])
    assert spdy.FrameReader().feed(wire) == [spdy.Ping(3)]


def _bomb() -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=spdy.DICTIONARY)
    block = struct.pack(">I", 1) + struct.pack(">I", 1) + b"x" + struct.pack(">I", 1 << 20) + b"a" * (1 << 20)
    return struct.pack(">I", 1) + deflate.compress(block) + deflate.flush(zlib.Z_SYNC_FLUSH)


def _block(raw: bytes) -> bytes:
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 8, zlib.Z_DEFAULT_STRATEGY, zdict=spdy.DICTIONARY)
    return struct.pack(">I", 1) + deflate.compress(raw) + deflate.flush(zlib.Z_SYNC_FLUSH)


MALFORMED = {
    "old version": (_control(spdy.PING, struct.pack(">I", 1), version=2), "SPDY version 2"),
    "data on stream 0": (struct.pack(">II", 0, 3) + b"abc", "DATA frame for stream 0"),
    "rst status 0": (_control(spdy.RST_STREAM, struct.pack(">II", 1, 0)), "with status 0"),
    "rst too long": (_control(spdy.RST_STREAM, struct.pack(">III", 1, 5, 0)), "4 bytes too many"),
    "short ping": (_control(spdy.PING, b"\x00\x01"), "PING frame: truncated"),
    "settings count": (_control(spdy.SETTINGS, struct.pack(">III", 2, 1, 1)), "2 entries do not fill"),
    "syn on stream 0": (_control(spdy.SYN_STREAM, struct.pack(">IIBB", 0, 0, 0, 0)), "for stream 0"),
    "garbage block": (_control(spdy.SYN_REPLY, struct.pack(">I", 1) + b"not zlib at all"), "does not decompress"),
    "huge block": (_control(spdy.SYN_REPLY, _bomb()), "header block larger than"),
    "truncated block": (_control(spdy.SYN_REPLY, _block(struct.pack(">II", 1, 99) + b"port")), "truncated"),
    "twice a header": (_control(spdy.SYN_REPLY, _block(
        struct.pack(">I", 2) + (struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) + b"b") * 2)), "'a' twice"),
}


@pytest.mark.parametrize("name", list(MALFORMED))
def test_malformed_input_is_a_clear_one_line_error(name: str) -> None:
    wire, words = MALFORMED[name]
    with pytest.raises(spdy.SpdyError) as info:
        spdy.FrameReader().feed(wire)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_the_scanner_skips_data_and_reads_control_frames() -> None:
    wire = _wire(FRAMES)
    for piece in (1, 9, 70_000):
        scanner = spdy.ControlScanner()
        got: list[spdy.Frame] = []
        for i in range(0, len(wire), piece):
            got += scanner.feed(wire[i:i + piece])
        assert got == [f for f in FRAMES if not isinstance(f, spdy.DataFrame)]


# ---------------------------------------------------------------------------------------
# the demo cluster's side, over a real WebSocket
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIStandIn]:
    with KubeAPIStandIn(tmp_path_factory.mktemp("standin"), tokens=(TOKEN,)) as api:
        yield api


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port


class Client:
    """kubectl's side of the tunnel, from the same framer."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.writer, self.reader = ws, spdy.FrameWriter(), spdy.FrameReader()
        self.frames: list[spdy.Frame] = []

    async def send(self, *frames: spdy.Frame) -> None:
        await self.ws.send_bytes(b"".join(self.writer.encode(f) for f in frames))

    async def next(self) -> spdy.Frame:
        while not self.frames:
            msg = await self.ws.receive(timeout=15)
            assert msg.type == aiohttp.WSMsgType.BINARY, (msg.type, msg.data, msg.extra)
            self.frames += self.reader.feed(msg.data)
        return self.frames.pop(0)

    async def open(self, request_id: str, port: int, first: int) -> None:
        for sid, kind in ((first, "error"), (first + 2, "data")):
            await self.send(spdy.SynStream(sid, {"streamtype": [kind], "port": [str(port)],
                                                 "requestid": [request_id]}))
            assert await self.next() == spdy.SynReply(sid)


async def _tunnel(api: KubeAPIStandIn, script: Any) -> Any:
    context = ssl.create_default_context(cafile=str(api.ca.file))
    url = f"{api.url}/api/v1/namespaces/default/pods/web/portforward"
    async with aiohttp.ClientSession() as session, session.ws_connect(
            url, protocols=(TUNNEL,), ssl=context, headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        assert ws.protocol == TUNNEL
        return await script(Client(ws))


def test_streams_are_forwarded_and_closed_like_the_kubelet_does(standin: KubeAPIStandIn, echo_port: int) -> None:
    big = os.urandom(200_000)

    async def script(c: Client) -> None:
        for first, payload in ((1, b"hello"), (5, big)):  # two connections, one after the other
            await c.open(str(first), echo_port, first)
            await c.send(spdy.DataFrame(first, fin=True))  # kubectl never writes on the error stream
            for i in range(0, len(payload), 32 * 1024):
                await c.send(spdy.DataFrame(first + 2, payload[i:i + 32 * 1024]))
            await c.send(spdy.DataFrame(first + 2, fin=True))
            got = bytearray()
            fins: set[int] = set()
            while fins != {first, first + 2}:
                frame = await c.next()
                assert isinstance(frame, spdy.DataFrame), frame
                if frame.stream_id == first + 2:
                    got += frame.data
                else:
                    assert frame.data == b""  # nothing went wrong
                if frame.fin:
                    fins.add(frame.stream_id)
            assert bytes(got) == payload
            await c.send(spdy.RstStream(first + 2, spdy.CANCEL))  # kubectl resets at the end: harmless
        await c.send(spdy.Ping(7))
        assert await c.next() == spdy.Ping(7)

    asyncio.run(_tunnel(standin, script))


def test_a_refused_connection_is_reported_on_the_error_stream(standin: KubeAPIStandIn) -> None:
    closed = free_port()

    async def script(c: Client) -> bytes:
        await c.open("0", closed, 1)
        message = b""
        fins: set[int] = set()
        while fins != {1, 3}:
            frame = await c.next()
            assert isinstance(frame, spdy.DataFrame)
            message += frame.data if frame.stream_id == 1 else b""
            fins |= {frame.stream_id} if frame.fin else set()
        return message

    message = asyncio.run(_tunnel(standin, script)).decode()
    assert message == (f"error forwarding port {closed} to pod default/web: dial tcp4 127.0.0.1:{closed}: "
                       f"connection refused")


def test_a_stream_with_bad_headers_is_refused_alone(standin: KubeAPIStandIn) -> None:
    async def script(c: Client) -> None:
        await c.send(spdy.SynStream(1, {"streamtype": ["data"], "port": ["http"], "requestid": ["0"]}))
        assert await c.next() == spdy.RstStream(1, spdy.REFUSED_STREAM)
        await c.send(spdy.SynStream(3, {"streamtype": ["stdin"], "port": ["80"]}))
        assert await c.next() == spdy.RstStream(3, spdy.REFUSED_STREAM)
        await c.send(spdy.Ping(9))  # the tunnel goes on
        assert await c.next() == spdy.Ping(9)

    asyncio.run(_tunnel(standin, script))


@pytest.mark.parametrize(("name", "wire", "reason"), [
    ("garbage", b"\x80\x03\x00\x01\x00\x00\x00\x04zzzz", "malformed SPDY: SYN_STREAM frame: truncated"),
    ("unknown stream", _wire([spdy.DataFrame(5, b"to nowhere")]), "DATA for stream 5, which was never opened"),
    ("reply from client", _wire([spdy.SynReply(1)]), "SYN_REPLY for stream 1, which the server never opened"),
    ("old stream id", _wire([spdy.SynStream(3, {"streamtype": ["error"], "port": ["1"]}),
                             spdy.SynStream(1, {"streamtype": ["data"], "port": ["1"]})]), "must be odd and grow"),
])
def test_bad_input_ends_the_tunnel_with_a_clear_error(standin: KubeAPIStandIn, caplog: pytest.LogCaptureFixture,
                                                      name: str, wire: bytes, reason: str) -> None:
    async def script(c: Client) -> Any:
        await c.ws.send_bytes(wire)
        while True:  # a SYN_REPLY or a GOAWAY may come first; then the close
            msg = await c.ws.receive(timeout=15)
            if msg.type != aiohttp.WSMsgType.BINARY:
                return msg

    with caplog.at_level(logging.INFO, logger="guarita.demo"):
        closed = asyncio.run(_tunnel(standin, script))
    assert closed.type == aiohttp.WSMsgType.CLOSE and closed.data == 1002 and reason in closed.extra, closed
    lines = [r for r in caplog.records if r.name == "guarita.demo" and "ended" in r.getMessage()]
    assert lines and reason in lines[-1].getMessage() and lines[-1].exc_info is None
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"


def test_the_v4_protocol_still_works(standin: KubeAPIStandIn, echo_port: int) -> None:
    async def run() -> bytes:
        context = ssl.create_default_context(cafile=str(standin.ca.file))
        url = f"{standin.url}/api/v1/namespaces/default/pods/web/portforward?ports={echo_port}"
        async with aiohttp.ClientSession() as session, session.ws_connect(
                url, protocols=("v4.channel.k8s.io",), ssl=context, headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            assert ws.protocol == "v4.channel.k8s.io"
            assert sorted([(await ws.receive_bytes(timeout=10))[0] for _ in range(2)]) == [0, 1]
            await ws.send_bytes(b"\x00v4 still")
            got = b""
            while len(got) < len(b"v4 still"):
                got += (await ws.receive_bytes(timeout=10))[1:]
            return got

    assert asyncio.run(run()) == b"v4 still"

