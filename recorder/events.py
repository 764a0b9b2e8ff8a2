"""Events: asciicast-compatible ``[t, code, data]`` lines.

Codes: ``o`` stdout, ``e`` stderr, ``i`` input (text); ``ob``/``eb``/``ib`` the same
streams when the bytes are not valid UTF-8 (data is base64, so recordings stay
byte-exact); ``r`` resize ``"COLSxROWS"``; ``m`` marker (a JSON object with a
``type``); ``x`` exit. asciicast readers skip codes they do not know.
"""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import Iterator
from typing import Any, NamedTuple

STREAM_CODES = ("o", "e", "i")
BINARY_SUFFIX = "b"


class Event(NamedTuple):
    t: float
    code: str
    data: Any

    def stream_bytes(self) -> bytes | None:
        """The raw bytes of an o/e/i event (text or binary form), else None."""
        if self.code in STREAM_CODES:
            return str(self.data).encode("utf-8")
        if len(self.code) == 2 and self.code[1] == BINARY_SUFFIX and self.code[0] in STREAM_CODES:
            return base64.b64decode(self.data)
        return None

    @property
    def stream(self) -> str | None:
        """``o``, ``e`` or ``i`` for stream events, whichever form they were stored in."""
        return self.code[0] if self.code and self.code[0] in STREAM_CODES and len(self.code) <= 2 else None


def encode(t: float, code: str, data: Any) -> bytes:
    return json.dumps([round(t, 6), code, data], ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def encode_binary(t: float, code: str, data: bytes) -> bytes:
    """``[t, "ob", "<base64>"]``: base64 needs no JSON escaping, so the line is built directly
    (the JSON encoder would scan every character of it again)."""
    return b"".join((b"[", repr(round(t, 6)).encode(), b',"', code.encode(), b'","',
                     base64.b64encode(data), b'"]\n'))


def decode_lines(text: bytes) -> Iterator[Event]:
    for line in text.splitlines():
        if line:
            t, code, data = json.loads(line)
            yield Event(float(t), code, data)


class StreamEncoder:
    """Turns a byte stream into o/ob events without splitting UTF-8 characters.

    A multi-byte character cut between two reads is held until the next read, so a
    text stream is always recorded as text; bytes that are not UTF-8 at all are
    recorded as base64 (``ob``) so nothing is lost or altered.
    """

    def __init__(self, code: str) -> None:
        self.code = code
        self._decoder = codecs.getincrementaldecoder("utf-8")("strict")

    def encode(self, t: float, data: bytes, final: bool = False) -> bytes:
        if len(data) >= 256 and _mostly_control(data):
            # Valid UTF-8 but not text (zeros, binary protocols): JSON would spell each byte
            # as \u0000, six times its size and slow to write; base64 is a third larger.
            pending, _ = self._decoder.getstate()
            self._decoder.reset()
            return encode_binary(t, self.code + BINARY_SUFFIX, pending + data)
        try:
            text = self._decoder.decode(data, final)
        except UnicodeDecodeError:
            pending, _ = self._decoder.getstate()
            self._decoder.reset()
            return encode_binary(t, self.code + BINARY_SUFFIX, pending + data)
        return encode(t, self.code, text) if text else b""

    def flush(self, t: float) -> bytes:
        pending, _ = self._decoder.getstate()
        self._decoder.reset()
        return encode_binary(t, self.code + BINARY_SUFFIX, pending) if pending else b""


# Control bytes other than tab, newline, carriage return and escape (which terminals use).
_CONTROL = bytes(b for b in range(32) if b not in (9, 10, 13, 27)) + b"\x7f"


def _mostly_control(data: bytes) -> bool:
    return len(data) - len(data.translate(None, _CONTROL)) > len(data) // 8
