"""The event encoder: byte-exact round trips, and lines identical to what json.dumps writes."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from recorder import events as ev


def replay(lines: bytes) -> bytes:
    return b"".join(e.stream_bytes() or b"" for e in ev.decode_lines(lines))


@given(st.text())
def test_text_lines_are_what_json_writes(text: str) -> None:
    assert ev.encode_text(12.3456789, "o", text.encode()) == ev.encode(12.3456789, "o", text)


@settings(max_examples=300)
@given(st.lists(st.binary(max_size=600) | st.text(max_size=300).map(str.encode), max_size=8))
def test_any_stream_round_trips(chunks: list[bytes]) -> None:
    enc = ev.StreamEncoder("o")
    lines = b"".join(enc.encode(float(i), c) for i, c in enumerate(chunks)) + enc.flush(99.0)
    assert replay(lines) == b"".join(chunks)
    for line in lines.splitlines():
        json.loads(line)  # every line is JSON on its own (asciicast readers rely on it)


def test_utf8_character_cut_between_reads_stays_text() -> None:
    enc = ev.StreamEncoder("o")
    data = "ação".encode()
    lines = enc.encode(0.0, data[:2]) + enc.encode(0.1, data[2:])
    assert [e.code for e in ev.decode_lines(lines)] == ["o", "o"]
    assert replay(lines) == data


def test_large_binary_chunks_are_compressed() -> None:
    enc = ev.StreamEncoder("o")
    zeros, noise = bytes(1 << 20), os.urandom(4096)
    lines = enc.encode(0.0, zeros) + enc.encode(0.1, noise) + enc.encode(0.2, b"\xff\x00")
    codes = [e.code for e in ev.decode_lines(lines)]
    assert codes == ["oz", "oz", "ob"]
    assert len(lines) < 10_000  # a mebibyte of zeros costs a few bytes, not 1.4 MB of base64
    assert replay(lines) == zeros + noise + b"\xff\x00"


def test_terminal_text_with_escapes_stays_readable_text() -> None:
    enc = ev.StreamEncoder("o")
    data = b"\x1b[1;31merror\x1b[0m: \"x\" \\ y\r\n" * 100
    (event,) = ev.decode_lines(enc.encode(0.0, data))
    assert event.code == "o" and event.data == data.decode()


def test_segments_are_cut_by_encoded_size(tmp_path: Path) -> None:
    """A run of zeros encodes to almost nothing, so it does not cut a segment per
    segment_bytes of terminal bytes (it used to: thousands of tiny objects per GB); text does."""
    from recorder import Recorder, RecordingKey
    from recorder.store import FileStore
    from replay.reader import iter_events, open_session

    text = b"".join(b"line %d of a build log with some words in it\r\n" % i for i in range(30000))

    async def record(data: bytes) -> tuple[int, bytes]:
        store = FileStore(tmp_path / "rec")
        rec = Recorder(store, tmp_path / "spool", RecordingKey.load_or_create(tmp_path / "key.pem"),
                       segment_seconds=60, segment_bytes=65536, flush_interval=0.05)
        await rec.start()
        session = rec.open_session({"kind": "exec"})
        for i in range(0, len(data), 32768):
            session.output(data[i:i + 32768])
            await session.sync()  # the worker reports each chunk's encoding before the next
        await session.close()
        await rec.close()
        summary = open_session(store, session.id)
        out = b"".join(e.stream_bytes() or b"" for e in iter_events(store, summary))
        return len(summary.manifest["segments"]), out

    zeros = bytes(4 << 20)
    zero_segments, out = asyncio.run(record(zeros))
    assert out == zeros
    text_segments, out = asyncio.run(record(text))
    assert out == text
    assert zero_segments <= 3  # 4 MiB at 64 KiB per segment was 64 segments
    assert text_segments >= len(text) // 65536
