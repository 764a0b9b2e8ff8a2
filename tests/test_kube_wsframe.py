"""bastion/doors/kube/wsframe.py: a binary frame in one transport write, through real aiohttp."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web

from bastion.doors.kube.wsframe import direct_writer, header, send_binary

SIZES = [0, 1, 125, 126, 65535, 65536, 300_000]


def _payload(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


async def _roundtrip(compress: bool) -> tuple[list[bytes], list[int], bool]:
    """Send one frame per size from a server WebSocket; what the client received, the size
    of each transport write, and whether the direct path was taken."""
    writes: list[int] = []
    direct: list[bool] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=compress)
        await ws.prepare(request)
        direct.append(direct_writer(ws) is not None)
        transport: Any = request.transport
        write = transport.write

        def counting(data: bytes) -> None:
            writes.append(len(data))
            write(data)

        transport.write = counting
        for n in SIZES:
            data = _payload(n)
            await send_binary(ws, [b"\x01", data[: n // 2], data[n // 2:]])
        transport.write = write
        await ws.close()
        return ws

    app = web.Application()
    app.router.add_get("/ws", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    got: list[bytes] = []
    try:
        async with aiohttp.ClientSession() as http, http.ws_connect(f"http://127.0.0.1:{port}/ws",
                                                                     compress=15 if compress else 0) as ws:
            async for msg in ws:
                if msg.type == aiohttp.WSMsgType.BINARY:
                    got.append(msg.data)
    finally:
        await runner.cleanup()
    return got, writes, direct[0]


def test_frame_header_lengths() -> None:
    assert header(125) == b"\x82\x7d"
    assert header(126) == b"\x82\x7e\x00\x7e"
    assert header(65536) == b"\x82\x7f" + (65536).to_bytes(8, "big")


def test_large_frames_go_out_in_one_write() -> None:
    """With the pinned aiohttp the direct path is taken (if this fails after an aiohttp
    upgrade, its writer changed: kube exec falls back to send_bytes, correct but slower)."""
    got, writes, direct = asyncio.run(_roundtrip(compress=False))
    assert direct
    assert got == [b"\x01" + _payload(n) for n in SIZES]
    assert writes == [len(header(n + 1)) + n + 1 for n in SIZES]  # one write per frame


def test_compressed_connection_falls_back_to_aiohttp() -> None:
    got, _, direct = asyncio.run(_roundtrip(compress=True))
    assert not direct
    assert got == [b"\x01" + _payload(n) for n in SIZES]
