"""The event encoder: byte-exact round trips, and lines identical to what json.dumps writes."""

from __future__ import annotations

import json
import os

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
