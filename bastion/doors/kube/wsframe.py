"""A binary WebSocket frame written to the client in one piece.

aiohttp writes a frame larger than 16 KiB as two transport writes, the header and then
the payload. Under TLS (asyncio's SSL transport) every write becomes its own TLS record
and its own send(): before each chunk of exec output went a ~30-byte record in its own
TCP segment, which kubectl woke up to read. Exec output crosses the gateway at hundreds
of MB/s in 32 KiB frames, so here the header and the payload go out together, built with
the one copy the frame needed anyway.

This uses aiohttp's writer (``WebSocketResponse._writer``) the way its own ``send_frame``
does: same closing checks, same flow control. Where the writer is not the plain kind
(a client-side writer that masks, a negotiated compression, another aiohttp whose
internals differ), :func:`send_binary` falls back to ``send_bytes``.
tests/test_kube_unit.py checks that the pinned aiohttp takes the direct path.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

from aiohttp import ClientConnectionResetError

_FIN_BINARY = 0x82
_LEN1 = struct.Struct("!BB")
_LEN2 = struct.Struct("!BBH")
_LEN3 = struct.Struct("!BBQ")


def header(length: int) -> bytes:
    """RFC 6455 header of an unmasked, final binary frame (server to client)."""
    if length < 126:
        return _LEN1.pack(_FIN_BINARY, length)
    if length < 65536:
        return _LEN2.pack(_FIN_BINARY, 126, length)
    return _LEN3.pack(_FIN_BINARY, 127, length)


def direct_writer(ws: Any) -> Any | None:
    """The writer of ``ws`` if a frame can be written to its transport as is, else None."""
    writer = getattr(ws, "_writer", None)
    if writer is None or writer.__class__.__name__ != "WebSocketWriter":
        return None
    try:
        if writer.use_mask or writer.compress or not hasattr(writer.protocol, "_drain_helper"):
            return None
        writer._output_size, writer._limit, writer._closing  # noqa: B018 - the fields used below
    except AttributeError:
        return None
    return writer


async def send_binary(ws: Any, parts: Sequence[bytes]) -> None:
    """Send the concatenation of ``parts`` as one binary frame, in one transport write."""
    writer = direct_writer(ws)
    if writer is None:
        await ws.send_bytes(b"".join(parts))
        return
    if writer._closing or writer.transport.is_closing():
        raise ClientConnectionResetError("Cannot write to closing transport")
    length = sum(map(len, parts))
    head = header(length)
    writer.transport.write(b"".join([head, *parts]))
    # aiohttp's flow control, as in WebSocketWriter.send_frame: wait for the transport once
    # this much has been written and it has asked to pause.
    writer._output_size += len(head) + length
    if writer._output_size > writer._limit:
        writer._output_size = 0
        if writer.protocol.writing_paused:
            await writer.protocol._drain_helper()
