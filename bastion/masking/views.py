"""Other readings of a segment's visible text, where a value may hide from the plain one.

The masker finds values in the visible text of a segment (escape sequences removed). Two
classes of output show a value that this plain reading misses, and each gets a *view*: a
byte string scanned like the plain text, with a map from each of its bytes back to the
visible text, so a value found there is masked where its bytes really are.

* **Encodings** (:func:`decoded_views`): percent-encoding (``ana%40example.com``,
  ``%2B5511...``, ``12.345.678%2F0001-95``), JSON and C string escapes (``\\/``,
  ``\\u0040``, ``\\x40``), HTML character references (``&#64;``), and ``+`` as a space
  between digits (form encoding: ``4111+1111+1111+1111``). Each escape is read as the
  ASCII character it stands for. Only windows around escapes are decoded: a value the
  plain reading can see needs no view.
* **Glue across an escape sequence** (:func:`split_view`): a colour code (or another
  sequence that may sit inside a value) between a value and a letter or digit hides the
  value from the plain reading (``529.982.247-25\\e[0mSilva`` reads as one word). The
  split view puts a separator (0xFF, which no value contains and which glues to nothing)
  at every such junction where a word character meets a word character, so a value
  bounded by escape sequences stands on its own. Junctions between a digit and a
  separator (``529.\\e[31m982``) stay joined: that is how programs colour part of a value.

A value found in a view counts only where it does not overlap one of the plain reading's
(stream.py merges them): the plain reading is the definition, the views only add.
"""

from __future__ import annotations

import bisect
import dataclasses
import re
from dataclasses import dataclass

# One encoded character: %XX, \uXXXX, \xXX, \/ \\ \" \', &#NN; &#xXX;, and + between digits.
_UNIT = re.compile(
    rb"%([0-9A-Fa-f]{2})|\\u([0-9A-Fa-f]{4})|\\x([0-9A-Fa-f]{2})|\\([/\\\"'])"
    rb"|&#([0-9]{2,3});|&#[xX]([0-9A-Fa-f]{2});|(?<=[0-9])\+(?=[0-9])"
)
# An escape cut by the end of the text (it may decode to part of a value once complete).
_CUT_UNIT = re.compile(rb"(?:%[0-9A-Fa-f]?|\\(?:u[0-9A-Fa-f]{0,3}|x[0-9A-Fa-f]?)?|&(?:#(?:[0-9]{0,3}|[xX][0-9A-Fa-f]{0,2}))?|\+)\Z")
_WORD = frozenset(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_")
SEPARATOR = b"\xff"
# How many bytes one decoded character may take at most (\u0040).
MAX_UNIT = 6


@dataclass
class View:
    """``text`` and, for each of its bytes, where it starts and ends in the visible text."""

    text: bytes
    starts: list[int]
    ends: list[int]
    # A view index from which on the text is held back (an escape cut by the end of the
    # segment), or len(text).
    open_from: int
    units: list[int] = dataclasses.field(default_factory=list)  # indices of decoded escapes

    def has_unit(self, q: int, e: int) -> bool:
        """Whether text[q:e] holds a decoded escape (else the plain reading sees the same)."""
        i = bisect.bisect_left(self.units, q)
        return i < len(self.units) and self.units[i] < e

    def index_at(self, v_pos: int) -> int:
        """The first view byte that starts at or after ``v_pos`` in the visible text."""
        lo, hi = 0, len(self.starts)
        while lo < hi:
            mid = (lo + hi) // 2
            if self.starts[mid] < v_pos:
                lo = mid + 1
            else:
                hi = mid
        return lo


def has_units(v: bytes) -> bool:
    """Whether a decoded view of ``v`` can differ from it (memchr-fast: most text has none)."""
    if b"%" in v or b"\\" in v or b"&" in v:
        return True
    i = v.find(b"+", 1)
    while i > 0:
        if 0x30 <= v[i - 1] <= 0x39:  # + after a digit: between digits once the next one comes
            return True
        i = v.find(b"+", i + 1)
    return False


def _decode(m: re.Match[bytes]) -> bytes | None:
    pct, uni, hexa, simple, dec, hexref = m.groups()
    if m.group() == b"+":
        return b" "
    if simple is not None:
        return simple
    code = int(pct or uni or hexa or hexref, 16) if dec is None else int(dec)
    return bytes([code]) if 0x20 <= code < 0x7F else None


def decoded_views(v: bytes, radius: int, final: bool) -> list[View]:
    """Views of ``v`` with its escapes decoded: one per window of ``radius`` bytes around a
    run of escapes (windows that touch are merged)."""
    units = [(m.start(), m.end(), d) for m in _UNIT.finditer(v) if (d := _decode(m)) is not None]
    cut = None if final else _CUT_UNIT.search(v, max(0, len(v) - MAX_UNIT))
    if not units and cut is None:
        return []
    spots = [(s, e) for s, e, _ in units] + ([(cut.start(), len(v))] if cut is not None else [])
    windows: list[list[int]] = []
    for s, e in spots:
        lo, hi = max(0, s - radius), min(len(v), e + radius)
        if windows and lo <= windows[-1][1]:
            windows[-1][1] = max(windows[-1][1], hi)
        else:
            windows.append([lo, hi])
    views = []
    k = 0
    for lo, hi in windows:
        text = bytearray()
        starts: list[int] = []
        ends: list[int] = []
        idx: list[int] = []
        pos = lo
        while k < len(units) and units[k][0] < lo:
            k += 1
        while k < len(units) and units[k][1] <= hi:
            s, e, d = units[k]
            for i in range(pos, s):
                starts.append(i)
                ends.append(i + 1)
            text += v[pos:s]
            idx.append(len(text))
            text += d
            starts.append(s)
            ends.append(e)
            pos = e
            k += 1
        for i in range(pos, hi):
            starts.append(i)
            ends.append(i + 1)
        text += v[pos:hi]
        open_from = len(text)
        if cut is not None and hi == len(v):
            # Read the cut escape as a digit for now: it holds back what it may complete.
            open_from = len(text) - (len(v) - cut.start())
            del text[open_from:]
            del starts[open_from:]
            del ends[open_from:]
            idx = [u for u in idx if u < open_from] + [open_from]
            text += b"0"
            starts.append(cut.start())
            ends.append(len(v))
        views.append(View(bytes(text), starts, ends, open_from, idx))
    return views


def glue_junctions(v: bytes, junctions: list[tuple[int, bool]]) -> list[int]:
    """The junctions to cut in the split view: where a two-byte escape sat (``firm``), and
    where a word character meets a word character across any other escape."""
    out = []
    for j, firm in junctions:
        if 0 < j < len(v) and (firm or (v[j - 1] in _WORD and v[j] in _WORD)):
            out.append(j)
    return out


def split_view(v: bytes, glue: list[int]) -> View:
    """``v`` with SEPARATOR inserted at each of the ``glue`` junctions."""
    text = bytearray()
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    for j in glue:
        text += v[pos:j]
        starts.extend(range(pos, j))
        ends.extend(range(pos + 1, j + 1))
        text += SEPARATOR
        starts.append(j)
        ends.append(j)
        pos = j
    text += v[pos:]
    starts.extend(range(pos, len(v)))
    ends.extend(range(pos + 1, len(v) + 1))
    return View(bytes(text), starts, ends, len(text), [])
