"""Per-segment search summaries: a bitmap of the trigrams `replay search` can match in a segment.

``replay search`` matches complete output lines (o and e events in recording order, each
event decoded as UTF-8 with "replace", escape sequences removed per line by
replay.asciicast.ANSI) and the ``command`` markers' text. The recorder builds, for each
segment, a Bloom filter with one hash of every trigram (three bytes, ASCII folded to lower
case) of:

* every output line that ends in the segment, whole: with the part of it carried from
  earlier segments (escape sequences split across segments, words split by them), and
  the segment's last, unfinished line too (it is matched there when the session ends);
* every command marker's text, as recorded (no escape removal, as search matches it).

A search takes the literals every match of its pattern must contain (``required``) and
reads only the segments whose filter holds all their trigrams, plus the earlier segments
the lines of those segments began in (``from``). A filter can say yes wrongly, never no:
a segment that might hold a hit is read. It is written in the segment's record
(``summary``), so the signed manifest covers it (docs/recording-format.md).

When in doubt the recorder writes ``"all": true`` (never skip): a line longer than
MAX_LINE bytes (search matches those in pieces), or segments after a spool failure.
Without the compiled half (recorder/_summary.c) no summary is written and search reads
every segment, as it does for recordings made before summaries existed.
"""

from __future__ import annotations

import base64
import importlib
import json
import logging
import os
import re
from re import _constants as _sre  # type: ignore[attr-defined]
from re import _parser as _sre_parse  # type: ignore[attr-defined,unused-ignore]
from typing import Any

FORMAT = "guarita-summary/1"
# Longest output line (characters) search matches whole; longer ones are matched in pieces.
MAX_LINE = 64 * 1024
# The largest filter (bits); _summary.c marks trigrams in a table of one byte per bit.
TABLE_SIZE = 32768
HASH_MULT = 0x9E3779B1
# A filter is folded (halved, OR-ing its halves) while the result stays this sparse: a literal
# of t trigrams absent from a segment then passes with probability about FILL ** t.
FILL = 0.35
MIN_BITS = 64
ABI = 2  # 2: fold()

try:
    _engine: Any = importlib.import_module("recorder._summary")
except ImportError:  # pragma: no cover - built where a C compiler is (setup.py)
    _engine = None
if _engine is not None and (getattr(_engine, "ABI", None) != ABI
                            or getattr(_engine, "TABLE_SIZE", None) != TABLE_SIZE):  # pragma: no cover
    logging.getLogger(__name__).warning(
        "recorder: the compiled summary %s is from another version of guarita; recordings get no search "
        "summaries until it is rebuilt (pip install .)", _engine.__file__)
    _engine = None

# The bench switches it off to measure what summaries cost; without the engine a summary
# would cost the recorder a Python loop per byte, so none is written.
ENABLED = _engine is not None and os.environ.get("GUARITA_SEARCH_SUMMARY", "").lower() != "off"

_ANSI_BYTES = re.compile(
    rb"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])")
# Bytes are folded with | 0x20 before hashing: A-Z become a-z (and a few other pairs merge).
_FOLD = bytes(b | 0x20 for b in range(256))
_TO_01 = bytes.maketrans(b"\x00\x01", b"01")


def trigram_bit(a: int, b: int, c: int) -> int:
    """The bit (of TABLE_SIZE) of a trigram of folded bytes, as _summary.c computes it."""
    return ((a | (b << 8) | (c << 16)) * HASH_MULT & 0xFFFFFFFF) >> 17


def add_py(table: bytearray, data: bytes, strip: bool, limit: int) -> bool:
    """What ``_summary.add`` does, in Python (the definition the C code is tested against):
    mark the trigrams of ``data`` (with ``strip``, of its lines with escape sequences removed
    as search removes them); say whether a line is longer than ``limit``."""
    pieces = bytes(data).split(b"\n")
    _mark(table, b"\n".join(_ANSI_BYTES.sub(b"", p) for p in pieces) if strip else bytes(data))
    return max(len(p) for p in pieces) > limit


def _mark(table: bytearray, text: bytes) -> None:
    text = text.translate(_FOLD)
    for i in range(len(text) - 2):
        table[trigram_bit(text[i], text[i + 1], text[i + 2])] = 1


class SummaryBuilder:
    """Builds the summaries of one session's segments from what the recorder encodes.

    The worker thread calls it with every run of stream bytes it encodes and the line it
    encoded them into (the encoder holds a UTF-8 character cut between reads until the
    next read of that stream, so bytes may be recorded later than they were read: the
    summary follows the recorded order), with every marker line, and at every seal."""

    def __init__(self) -> None:
        self._bits = bytearray(TABLE_SIZE)
        self._index = 0  # the segment being written
        self._from = 0  # where the line this segment starts with began
        self._all = False
        self._held: dict[str, bytes] = {}
        self._carry: list[bytes] = []  # the unfinished line, raw
        self._carry_len = 0
        self._long = False  # the unfinished line is longer than MAX_LINE (its bytes are not kept)
        self._line_from: int | None = None  # the segment the unfinished line began in
        self._tainted = False

    def run(self, stream: str, data: bytes, line: bytes) -> None:
        """A run of ``stream`` bytes that the stream's encoder turned into ``line``."""
        if stream not in ("o", "e"):
            return
        held = self._held.pop(stream, b"")
        if not line:  # a character still incomplete: all of it is held
            self._held[stream] = held + data
            return
        if _binary(line):  # binary events carry the held bytes and hold nothing
            self._feed(held + data if held else data)
            return
        keep = _incomplete_tail(held + data[-3:] if len(data) < 3 else data)
        if held:
            self._feed(held)
        self._feed(data[:len(data) - keep] if keep else data)
        if keep:
            self._held[stream] = data[len(data) - keep:]

    def flushed(self, stream: str, line: bytes) -> None:
        """The encoder of ``stream`` flushed its held bytes into ``line`` (at exit)."""
        held = self._held.pop(stream, b"")
        if line and stream in ("o", "e"):
            self._feed(held)

    def marker(self, line: bytes) -> None:
        """An encoded event line that is not stream data: command markers are searched."""
        if b'"type":"command"' not in line:
            return
        try:
            data = json.loads(line)[2]
        except (ValueError, IndexError, TypeError):
            return
        if isinstance(data, dict) and data.get("type") == "command":
            _engine.add(self._bits, str(data.get("command", "")).encode("utf-8", "surrogatepass"), False, 0)

    def taint(self) -> None:
        """The spool failed: what was recorded may differ from what was fed; never skip again."""
        self._tainted = True

    def seal(self, index: int) -> dict[str, Any]:
        """The summary of segment ``index`` (now sealed); the next one starts."""
        if self._tainted or self._long:
            summary: dict[str, Any] = {"format": FORMAT, "from": self._from, "all": True}
        else:
            if self._carry:
                self._add(b"".join(self._carry))  # the unfinished line: matched here if the session ends
            summary = {"format": FORMAT, "from": self._from, **({"all": True} if self._all else _fold(self._bits))}
        self._bits = bytearray(TABLE_SIZE)
        self._all = False
        self._index = index + 1
        if not self._tainted:
            self._from = self._line_from if self._line_from is not None else index + 1
        return summary

    def _feed(self, data: bytes) -> None:
        """Stream bytes (o and e) in recorded order."""
        if not data:
            return
        if self._line_from is None:
            self._line_from = self._index
        last = data.rfind(b"\n")
        if last < 0:
            self._extend_carry(data)
            return
        first = data.find(b"\n")
        if self._long:
            self._all, self._long = True, False
        else:
            self._add(b"".join((*self._carry, data[:first + 1])) if self._carry else data[:first + 1])
        self._carry, self._carry_len = [], 0
        if last > first:
            self._add(memoryview(data)[first + 1:last + 1])
        self._line_from = None
        if last + 1 < len(data):
            self._line_from = self._index
            self._extend_carry(data[last + 1:])

    def _extend_carry(self, data: bytes) -> None:
        if self._long:
            self._all = True
            return
        self._carry.append(data)
        self._carry_len += len(data)
        if self._carry_len > MAX_LINE:
            self._carry, self._carry_len, self._long, self._all = [], 0, True, True

    def _add(self, data: bytes | memoryview) -> None:
        if _engine.add(self._bits, data, True, MAX_LINE):
            self._all = True  # search matches this line in pieces, stripped piece by piece


def _binary(line: bytes) -> bool:
    """``[t,"ob",...`` / ``[t,"oz",...`` rather than ``[t,"o",...``."""
    at = line.find(b',"') + 3
    return line[at:at + 1] != b'"'


def _incomplete_tail(data: bytes) -> int:
    """Bytes at the end of valid UTF-8 ``data`` that start a character not yet complete."""
    for back in range(1, min(3, len(data)) + 1):
        byte = data[-back]
        if byte < 0x80:
            return 0
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return back if need > back else 0
    return 0


def _fold(table: bytearray) -> dict[str, Any]:
    """The filter of a segment: the table folded while it stays sparse (_summary.c ``fold``)."""
    size, packed = _engine.fold(table, MIN_BITS, FILL)
    return {"bits": size, "bloom": base64.b64encode(packed).decode()}


def _fold_python(table: bytearray) -> dict[str, Any]:
    """What ``_summary.fold`` computes, in Python (the definition it is tested against)."""
    value = int(table.translate(_TO_01)[::-1], 2)  # bit i = table[i], at C speed
    size = TABLE_SIZE
    while size > MIN_BITS:
        half = size // 2
        folded = (value & ((1 << half) - 1)) | (value >> half)
        if folded.bit_count() > FILL * half:
            break
        value, size = folded, half
    return {"bits": size, "bloom": base64.b64encode(value.to_bytes(size // 8, "little")).decode()}


# -- the search side ----------------------------------------------------------------------------

# A query: bytes (a literal every match contains), or ("and" | "or", (queries...)).
Query = Any
TRUE: Query = ("and", ())


def required(pattern: re.Pattern[str]) -> Query:
    """What every match of ``pattern`` must contain, as literals under and/or; TRUE when
    nothing is certain (then no segment is skipped)."""
    if not isinstance(pattern.pattern, str):
        return TRUE
    try:
        parsed = _sre_parse.parse(pattern.pattern, pattern.flags)
    except Exception:  # noqa: BLE001 - whatever re's private parser does, do not skip
        return TRUE
    return _sequence(list(parsed), parsed.state.flags)


def _sequence(items: list[tuple[Any, Any]], flags: int) -> Query:
    parts: list[Query] = []
    run: list[str] = []

    def close() -> None:
        if run:
            parts.append("".join(run).encode("utf-8", "surrogatepass"))
            run.clear()

    for op, av in items:
        if op is _sre.LITERAL and not _breaks(chr(av), flags):
            run.append(chr(av))
            continue
        if op in (_sre.SUBPATTERN, _sre.ATOMIC_GROUP):
            sub, inner = (av[3], (flags | av[1]) & ~av[2]) if op is _sre.SUBPATTERN else (av, flags)
            chars = _literal_chars(list(sub), inner)
            if chars is not None:  # (abc): part of the run around it
                run.extend(chars)
                continue
            close()
            parts.append(_sequence(list(sub), inner))
            continue
        close()
        if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT) and av[0] >= 1:
            parts.append(_sequence(list(av[2]), flags))
        elif op is _sre.BRANCH:
            alternatives = tuple(_sequence(list(alt), flags) for alt in av[1])
            parts.append(TRUE if TRUE in alternatives else ("or", alternatives))
        # Anything else (classes, any, anchors, lookarounds, back references) requires nothing.
    close()
    return ("and", tuple(p for p in parts if p != TRUE))


def _literal_chars(items: list[tuple[Any, Any]], flags: int) -> list[str] | None:
    if items and all(op is _sre.LITERAL and not _breaks(chr(av), flags) for op, av in items):
        return [chr(av) for _, av in items]
    return None


def _breaks(ch: str, flags: int) -> bool:
    """A character that cannot be looked up: U+FFFD (search's replacement for bytes that are
    not UTF-8), and under IGNORECASE anything but ASCII, and k, s, i (which match the
    Kelvin sign, the long s, dotted and dotless i)."""
    if ch == "\ufffd":
        return True
    return bool(flags & re.IGNORECASE) and (not ch.isascii() or ch in "kKsSiI")


def _holds(query: Query, bloom: int, size: int) -> bool:
    if isinstance(query, bytes):
        text = query.translate(_FOLD)
        return all(bloom >> (trigram_bit(text[i], text[i + 1], text[i + 2]) & (size - 1)) & 1
                   for i in range(len(text) - 2))
    kind, parts = query
    return all(_holds(q, bloom, size) for q in parts) if kind == "and" else any(
        _holds(q, bloom, size) for q in parts)


def may_match(summary: Any, query: Query) -> bool:
    """False only when the segment with this summary cannot hold a match of ``query``."""
    if not isinstance(summary, dict) or summary.get("format") != FORMAT or summary.get("all"):
        return True
    try:
        size = int(summary["bits"])
        bloom = base64.b64decode(summary["bloom"], validate=True)
    except (KeyError, TypeError, ValueError):
        return True
    if size < 8 or size & (size - 1) or len(bloom) * 8 != size:
        return True
    return _holds(query, int.from_bytes(bloom, "little"), size)


def read_plan(segments: list[dict[str, Any]], pattern: re.Pattern[str]) -> list[tuple[int, bool]] | None:
    """The segments a search for ``pattern`` must read, as (index, starts mid-line): a segment
    read after one that is not starts with the end of a line whose text is elsewhere, which
    search must not match. None: read them all (a segment without summary, or a pattern
    without a certain literal)."""
    froms: list[int] = []
    for k, record in enumerate(segments):
        summary = record.get("summary") if isinstance(record, dict) else None
        if not isinstance(summary, dict) or summary.get("format") != FORMAT or record.get("index") != k:
            return None
        start = summary.get("from")
        if not isinstance(start, int) or not 0 <= start <= k:
            return None
        froms.append(start)
    query = required(pattern)
    if query == TRUE:
        return None
    need = [False] * len(segments)
    for k, record in enumerate(segments):
        if may_match(record["summary"], query):
            for j in range(froms[k], k + 1):
                need[j] = True
    return [(k, k > 0 and not need[k - 1] and froms[k] < k) for k in range(len(segments)) if need[k]]
