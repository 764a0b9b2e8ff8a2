"""Events: asciicast-compatible ``[t, code, data]`` lines.

Codes: ``o`` stdout, ``e`` stderr, ``i`` input (text); ``ob``/``eb``/``ib`` the same
streams when the bytes are not text (data is base64, so recordings stay byte-exact);
``oz``/``ez``/``iz`` likewise for larger binary chunks, whose data is the base64 of one
zstd frame; ``r`` resize ``"COLSxROWS"``; ``m`` marker (a JSON object with a ``type``);
``x`` exit. asciicast readers skip codes they do not know.

Stream events are the bulk of every recording, so their lines are built from bytes with a
few C-level passes (``bytes.translate``/``replace``) rather than by the JSON encoder, which
is about eight times slower; the result is byte for byte what ``json.dumps`` writes.
"""

from __future__ import annotations

import base64
import codecs
import importlib
import json
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import zstandard

STREAM_CODES = ("o", "e", "i")
BINARY_SUFFIX = "b"
COMPRESSED_SUFFIX = "z"
# Binary chunks at least this long are compressed before base64: a run of zeros or a
# binary protocol then costs almost nothing to encode, store and hash.
COMPRESS_FROM = 256


class Event(NamedTuple):
    t: float
    code: str
    data: Any

    def stream_bytes(self) -> bytes | None:
        """The raw bytes of an o/e/i event (text or binary form), else None."""
        if self.code in STREAM_CODES:
            return str(self.data).encode("utf-8")
        if len(self.code) == 2 and self.code[0] in STREAM_CODES:
            if self.code[1] == BINARY_SUFFIX:
                return base64.b64decode(self.data)
            if self.code[1] == COMPRESSED_SUFFIX:
                return zstandard.ZstdDecompressor().decompress(base64.b64decode(self.data))
        return None

    @property
    def stream(self) -> str | None:
        """``o``, ``e`` or ``i`` for stream events, whichever form they were stored in."""
        return self.code[0] if self.code and self.code[0] in STREAM_CODES and len(self.code) <= 2 else None


def encode(t: float, code: str, data: Any) -> bytes:
    return json.dumps([round(t, 6), code, data], ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def encode_with_json(t: float, code: str, data: dict[str, Any], key: str, raw: bytes) -> bytes:
    """:func:`encode` of ``{**data, key: value}`` where ``raw`` is already the JSON text of
    ``value`` (large marker payloads encoded in C, bastion/masking/engine.py)."""
    line = encode(t, code, data)
    assert line.endswith(b"}]\n")
    sep = b"," if data else b""
    return b"".join((line[:-3], sep, json.dumps(key).encode(), b":", raw, b"}]\n"))


def encode_text(t: float, code: str, utf8: bytes) -> bytes:
    """``[t, code, "<text>"]`` from valid UTF-8 bytes: what :func:`encode` writes for the
    decoded string, built without decoding it."""
    return _line(t, code, json_escape(utf8))


def encode_binary(t: float, code: str, data: bytes) -> bytes:
    """``[t, "ob", "<base64>"]``: base64 needs no JSON escaping."""
    return _line(t, code, base64.b64encode(data))


def json_escape(utf8: bytes) -> bytes:
    """The body of a JSON string (``ensure_ascii=False``) holding valid UTF-8 ``utf8``."""
    return _c_escape(utf8) if _c_escape is not None else py_json_escape(utf8)


def py_json_escape(utf8: bytes) -> bytes:
    """:func:`json_escape` in Python (where recorder/_escape.c is not built)."""
    present = utf8.translate(None, _NO_ESCAPE)
    if not present:
        return utf8
    # Backslash first: the later replacements insert backslashes of their own.
    for byte in sorted(set(present), key=lambda b: b != 0x5C):
        utf8 = utf8.replace(bytes((byte,)), _ESCAPES[byte])
    return utf8


def _line(t: float, code: str, body: bytes) -> bytes:
    return b"".join((b"[", repr(round(t, 6)).encode(), b',"', code.encode(), b'","', body, b'"]\n'))


# What JSON escapes inside a string: the quote, the backslash and every byte below 0x20.
_ESCAPES = {b: json.dumps(chr(b))[1:-1].encode() for b in (*range(32), 0x22, 0x5C)}
_NO_ESCAPE = bytes(b for b in range(256) if b not in _ESCAPES)


def _load_escape() -> Any:
    """recorder/_escape.c: the same escaping in two C passes (the Python one is ~1.3 CPU s/GB
    of terminal text, as much as compressing it). Optional: built by ``pip install`` where a
    C compiler is found; GUARITA_RECORDER_ESCAPE=python turns it off."""
    if os.environ.get("GUARITA_RECORDER_ESCAPE", "").lower() == "python":
        return None
    try:
        module = importlib.import_module("recorder._escape")
    except ImportError:
        return None
    return module.escape if getattr(module, "ABI", None) == _ESCAPE_ABI else None


_ESCAPE_ABI = 1
_c_escape = _load_escape()


def decode_lines(text: bytes) -> Iterator[Event]:
    for line in text.splitlines():
        if line:
            t, code, data = json.loads(line)
            yield Event(float(t), code, data)


class StreamEncoder:
    """Turns a byte stream into o/ob/oz events without splitting UTF-8 characters.

    A multi-byte character cut between two reads is held until the next read, so a
    text stream is always recorded as text; bytes that are not UTF-8 at all, or mostly
    control bytes, are recorded as binary so nothing is lost or altered. Not thread-safe:
    one per stream, used by one thread at a time.
    """

    def __init__(self, code: str) -> None:
        self.code = code
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")
        self._zstd = zstandard.ZstdCompressor(level=1)

    def encode(self, t: float, data: bytes, final: bool = False) -> bytes:
        pending, _ = self._decoder.getstate()
        if len(data) >= COMPRESS_FROM and _mostly_control(data[:SAMPLE]):
            # Not text (zeros, binary protocols): JSON would spell each byte as \u0000, six
            # times its size. Judged by a sample: either form is exact, only the size differs.
            return self._binary(t, pending + data if pending else data)
        if not pending and data.isascii():  # the common case: no decoder needed
            return _line(t, self.code, json_escape(data))
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError:
            return self._binary(t, pending + data)
        return encode_text(t, self.code, text.encode("utf-8")) if text else b""

    def flush(self, t: float) -> bytes:
        pending, _ = self._decoder.getstate()
        return self._binary(t, pending) if pending else b""

    def _binary(self, t: float, data: bytes) -> bytes:
        self._decoder.reset()
        if len(data) >= COMPRESS_FROM:
            return _line(t, self.code + COMPRESSED_SUFFIX, base64.b64encode(self._zstd.compress(data)))
        return encode_binary(t, self.code + BINARY_SUFFIX, data)


# Control bytes other than tab, newline, carriage return and escape (which terminals use).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 13, 27)) + b"\x7f"
SAMPLE = 4096


def _mostly_control(data: bytes) -> bool:
    return len(data) - len(data.translate(None, _CONTROL)) > len(data) // 8
