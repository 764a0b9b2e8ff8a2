"""bastion/doors/kube/logmask.py: the log relay releases a held-back tail after silence (``logs -f``)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

from bastion.doors.kube.logmask import MaskedLogRelay
from bastion.masking import StreamMasker, default_detectors


class _Content:
    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    async def readany(self) -> bytes:
        return await self.queue.get()


class _Out:
    def __init__(self) -> None:
        self.data = b""
        self.changed = asyncio.Event()

    async def write(self, data: bytes) -> None:
        self.data += data
        self.changed.set()


async def _until(out: _Out, expected: bytes) -> None:
    async with asyncio.timeout(5):
        while out.data != expected:
            out.changed.clear()
            await out.changed.wait()


def test_follow_stream_holds_a_cut_value_through_silence_and_audits_values() -> None:
    """``logs -f``: a line cut in the middle of a value by a pause of the log stays held
    (masking decides on content, never on time) and is masked once the rest comes."""
    events: list[tuple[str, dict[str, Any]]] = []
    masked: list[tuple[str, int]] = []
    gw = SimpleNamespace(config=SimpleNamespace(masking=SimpleNamespace(flush_after=0.005)), masking_secret=b"k" * 32,
                         audit=SimpleNamespace(emit=lambda name, **fields: events.append((name, fields))),
                         metrics=SimpleNamespace(masked=lambda detector, count=1: masked.append((detector, count))))

    async def scenario() -> bytes:
        resp = SimpleNamespace(content=_Content())
        out = _Out()
        relay = MaskedLogRelay(gw, StreamMasker(default_detectors(), b"k" * 32), {"pod": "web"})
        task = asyncio.create_task(relay.relay(resp, out))  # type: ignore[arg-type]
        resp.content.queue.put_nowait(b"cliente 529.982.247-25\npedido 529.982.")
        await _until(out, b"cliente ***.***.***-**\npedido ")
        for _ in range(5):  # a pause in the log: the cut CPF stays held
            await asyncio.sleep(0)
        assert out.data == b"cliente ***.***.***-**\npedido "
        resp.content.queue.put_nowait(b"247-25 12345")
        resp.content.queue.put_nowait(b"")  # end of the stream
        await task
        return out.data

    assert asyncio.run(scenario()) == b"cliente ***.***.***-**\npedido ***.***.***-** 12345"
    assert [name for name, _ in events] == ["kube.logs.masked"]
    assert events[0][1]["masking"] == {"cpf": 2} and events[0][1]["values"][0][0] == "cpf"
    assert sum(n for detector, n in masked if detector == "cpf") == 2  # counted in the metrics too
