"""Masking a terminal byte stream incrementally, with a bounded held-back tail.

The model
---------
The output of a terminal is split into *visible* bytes and *escape sequences* (CSI
``ESC [ ... final``, and two/three-byte escapes such as ``ESC ( B`` or ``ESC ]``). Escape
sequences are invisible to detection: ``123.\\x1b[31m456\\x1b[0m.789-09`` is seen as
``123.456.789-09``; they are kept in the output while the visible characters around them
are replaced. The payload of an OSC (window title, hyperlink) is visible text.

The visible bytes form *segments*. A segment ends (a value can never span the break):

* where more than ``escape_gap`` bytes of escape sequences separate two visible bytes,
* on entering or leaving the alternate screen (``ESC [ ? 1049 h`` / ``l``, also 1047 and
  47), when ``passthrough_alt_screen`` is on: everything shown on the alternate screen
  (vim, less, top...) passes through untouched and unscanned,
* at every :meth:`StreamMasker.flush`.

In each segment, values are found left to right: at each step the leftmost valid value
wins, and the search resumes after it. At the same start, the longer value wins (an
e-mail address whose local part is a CPF is masked as an e-mail address); numeric
detectors are tried in list order and the first that validates is the numeric candidate. A value is not masked if one of the 32 bytes before it is a NUL or another C0
control byte that text does not use (binary data). Bytes that are not UTF-8 never take
part in a built-in match and are never rewritten.

Streaming
---------
:meth:`StreamMasker.feed` emits every byte whose fate is decided and holds back a tail
that could still become (part of) a value, so that for any chunking of a stream,
``feed(c1) + feed(c2) + ... + flush()`` equals ``feed(whole) + flush()``, and the
:class:`Masked` records are the same. The held tail never exceeds :attr:`hold_limit`
bytes: ``(R + 2) * (escape_gap + 1) + 39`` where ``R`` is the most characters any
detector examines from a value's start (the longest value plus its look-ahead), 39 the
longest escape sequence recognised. In practice the tail is the trailing run of
characters that could still belong to a value (a few bytes at a shell prompt).
Multibyte UTF-8 characters are never split between two outputs.

Speed
-----
Where it is built, the compiled engine (``bastion/masking/engine.py``) does the work of
:meth:`StreamMasker._scan` and ``_apply`` for the built-in detectors: a whole plain chunk in
one call (``_run_plain``), or each segment of a tokenised one (``_engine_scan``). This
module stays the definition; the tests hold the engine to it byte for byte.
"""

from __future__ import annotations

import functools
import hashlib
import re
from bisect import bisect_left, bisect_right
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from bastion.masking import engine as _engine_mod
from bastion.masking import views as _views
from bastion.masking.detectors import _NUM_L, _NUM_R, BUILTINS, DIGIT_FAMILY, EMAIL_FAMILY, Detector

try:  # optional: a wheel for x86-64 Linux bundles the library; elsewhere the Python pre-filter
    import hyperscan
except ImportError:  # pragma: no cover - depends on the platform
    hyperscan = None  # type: ignore[assignment]
# Use Hyperscan for the pre-filter when it imports (checked when a masker is built; the tests
# switch it off to run the pure-Python pre-filter).
HYPERSCAN = hyperscan is not None

ESC_MAX = 39  # ESC [ + 32 parameter bytes + 4 intermediate bytes + final byte
DEFAULT_ESCAPE_GAP = 32
BINARY_WINDOW = 32
_DENSE_ZONE = 256  # starts checked per regex call when candidates are back to back

_ESC_RE = re.compile(rb"\x1b(?:\[[\x30-\x3f]{0,32}[\x20-\x2f]{0,4}[\x40-\x7e]|[\x20-\x2f]{0,4}[\x30-\x5a\x5c-\x7e])")
_ESC_PREFIX = re.compile(rb"\x1b(?:\[[\x30-\x3f]{0,32}[\x20-\x2f]{0,4}|[\x20-\x2f]{0,4})")
_ALT_ENTER = frozenset((b"\x1b[?1049h", b"\x1b[?1047h", b"\x1b[?47h"))
_ALT_EXIT = re.compile(rb"\x1b\[\?(?:1049|1047|47)l|\x1bc")
_BINARY = re.compile(rb"[\x00-\x06\x0e-\x1a\x1c-\x1f]")

# Shape of the visible text for the cheap pre-filter: digits -> '0', the separators of
# numeric values ('-', '/', ' ', '(', ')', '+') -> '-', '.' stays, letters and '_' -> 'a',
# anything else -> 'x'. Every value a built-in numeric detector accepts contains one of
# these in this shape (see _DigitSource.hit; tests/test_masking_stream.py checks it):
#   _RUN11     a run of 11+ digits glued to no letter (bare CPF, CNPJ, card, long phone)
#   _SEP_RUN8  a separator then 8 digits (phones "(11) 23456789", "11 912345678", "+1...")
#   _RUN8_SEP  8 digits, a separator, 2 digits (CPF "123456789-09")
#   _GROUPS4   4 digits, a separator, 4 digits (cards, phones, CNPJ "12345678/0001-95")
#   _CPF_TAIL  ".ddd" + separator + 2 digits (formatted CPF and CNPJ)
# A run of 8-10 digits alone is none of them: no detector accepts it (ten bare digits are
# refused as a phone). Clean text costs one translate() and five searches, all in C.
_SHAPE = bytearray(b"x" * 256)
for _c in b"0123456789":
    _SHAPE[_c] = ord("0")
for _c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz_":
    _SHAPE[_c] = ord("a")
for _c in b"-/ ()+":
    _SHAPE[_c] = ord("-")
_SHAPE[ord(".")] = ord(".")
SHAPE = bytes(_SHAPE)
_RUN11 = b"0" * 11
_SEP_RUN8 = b"-" + b"0" * 8
_RUN8_SEP = b"0" * 8 + b"-00"
_GROUPS4 = b"0000-0000"
_CPF_TAIL = re.compile(rb"\.000-00")  # sre's scan for a rare first byte beats bytes.find here
_RUN_END = re.compile(rb"0*+")
_FREE_RUN11 = re.compile(rb"00000000000(?<![a0]00000000000)0*+(?!a)")
_NONE = 1 << 62

# The same shapes on the raw visible bytes, for Hyperscan: (pattern, how far before the
# match's end the hit is reported). One scan of a segment finds every hit in C, outside the
# GIL (~0.2 callbacks per KiB on a digit-heavy log); the Python validation runs only in the
# zones around them, exactly as with the shapes above.
_HS_D, _HS_SEP = rb"[0-9]", rb"[\-/ ()+]"
_HS_SHAPES = (
    # _RUN11, only where glued to no letter or '_' on either side: one match per run, ending
    # at its last digit or the byte after it; the hit is a digit of the run either way.
    (rb"(?:^|[^0-9A-Za-z_])[0-9]{11,}(?:[^0-9A-Za-z_]|\z)", 2),
    (_HS_SEP + _HS_D + b"{8}", 8),  # _SEP_RUN8, at its first digit
    (_HS_D + b"{8}" + _HS_SEP + _HS_D + b"{2}", 11),  # _RUN8_SEP
    (_HS_D + b"{4}" + _HS_SEP + _HS_D + b"{4}", 9),  # _GROUPS4
    # Narrower than _CPF_TAIL, which only formatted CPFs and CNPJs need: ".ddd.ddd-" or
    # ".ddd.ddd/", at its first digit. (A fifth pattern as wide as the others makes the
    # whole scan ~30 % slower on digit-heavy logs.)
    (rb"\." + _HS_D + rb"{3}\." + _HS_D + rb"{3}[\-/]", 8),
)
_HS_BACK = tuple(back for _, back in _HS_SHAPES)
_BUILTIN_DIGIT_PATTERNS = frozenset(p for b in BUILTINS.values() if b.family == "digits" for p in b.patterns)
# Supersets of where values may start (see _NUM_L and the e-mail pattern in detectors).
_NUM_START = re.compile(rb"(?<![0-9A-Za-z_+])[0-9(+]")
_EMAIL_START = re.compile(rb"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]")


class Masked(NamedTuple):
    """One masked value: what found it, where it was, its keyed hash, what replaced it.

    ``offset`` is the byte offset of the value's first character in the original stream
    and ``length`` the number of original bytes from there to its last character
    (escape sequences inside the value included). The value itself is never kept:
    ``hmac`` is hex HMAC-SHA256(secret, normalised value) (CPF/CNPJ/card: digits only;
    phones: ``+55...``/``+...``; e-mail: lower case; custom: the text as found).
    """

    detector: str
    offset: int
    length: int
    hmac: str
    replacement: str


@dataclass
class _Seg:
    v: bytes  # visible bytes; v[:start] is context already emitted
    start: int
    runs: list[tuple[int, int, int]]  # (v offset, buffer offset, length) of visible runs
    vstarts: list[int]
    # (v offset, firm) right after escape sequences that may sit inside a value
    # (views.split_view); firm: a two-byte escape (_is_firm) was among them
    junctions: list[tuple[int, bool]]

    def orig(self, d: int) -> int:
        i = bisect_right(self.vstarts, d) - 1
        v0, o0, _ = self.runs[i]
        return o0 + (d - v0)

    def pieces(self, q: int, e: int) -> list[tuple[int, int]]:
        """Buffer ranges holding visible bytes v[q:e]."""
        if len(self.runs) == 1:
            v0, o0, _ = self.runs[0]
            return [(o0 + q - v0, o0 + e - v0)]
        out = []
        i = bisect_right(self.vstarts, q) - 1
        while q < e:
            v0, o0, n = self.runs[i]
            stop = min(e, v0 + n)
            out.append((o0 + q - v0, o0 + stop - v0))
            q = stop
            i += 1
        return out


# A candidate value: (start, -end, rank of the detector in the masker's list, normalised
# text). Plain tuples: their order is the preference (leftmost, then longest, then rank).
_Cand = tuple[int, int, int, str]


class StreamMasker:
    """Masks personal data in a byte stream fed in arbitrary chunks (see module doc).

    ``hold_limit`` bounds the held-back tail in bytes; the tolerated run of escape
    sequences between two characters of one value (``escape_gap``, default 32 bytes) is
    derived from it. ValueError if it is too small to hold the longest value.
    """

    def __init__(self, detectors: Sequence[Detector], secret: bytes, *,
                 hold_limit: int | None = None, passthrough_alt_screen: bool = False) -> None:
        if not secret:
            raise ValueError("the HMAC secret is empty")
        self.detectors = list(detectors)
        names = [d.name for d in self.detectors]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate detector names in {names}")
        # HMAC-SHA256 by hand (RFC 2104): copying two prepared SHA-256 states costs a third
        # of hmac.new() or hmac.digest() per value.
        key = hashlib.sha256(secret).digest() if len(secret) > 64 else secret
        key = key.ljust(64, b"\0")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in key))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in key))
        self._pass_alt = passthrough_alt_screen
        self._digits = [(i, d) for i, d in enumerate(self.detectors) if d.family == "digits"]
        self._emails = [(i, d) for i, d in enumerate(self.detectors) if d.family == "email"]
        self._customs = [(i, d) for i, d in enumerate(self.detectors) if d.family == "custom"]
        # All numeric patterns in one regex; the group that matched names the first detector
        # (in priority order) that can match at that start.
        self._union = _digit_union(self._digits) if self._digits else None
        self._union_det = {f"d{j}p{k}": j for j, (_, d) in enumerate(self._digits) for k in range(len(d.patterns))}
        # The shape pre-filter (SHAPE) knows the built-in numeric patterns only.
        self._prefilter = all(p.pattern.decode() in _BUILTIN_DIGIT_PATTERNS for _, d in self._digits for p in d.patterns)
        # Scratch space is per masker (a masker is fed by one thread at a time); the database
        # is shared.
        self._hs_scratch = hyperscan.Scratch(_hs_database()) if HYPERSCAN and self._prefilter and self._digits else None
        self._bin_v: bytes | None = None
        self._bin_any = False
        # The compiled engine (bastion/masking/engine.py) for plain text, when it covers
        # these detectors; None: everything runs here.
        self._engine = _engine_mod.build(self.detectors, secret, Masked)
        self._email_re = (re.compile(b"|".join(b"(?:" + p.pattern + b")" for _, d in self._emails
                                               for p in d.patterns)) if self._emails else None)
        self._w_digits = max((d.max_length for _, d in self._digits), default=0)
        self._min_digits = min((d.min_length for _, d in self._digits), default=0)
        self._min_email = min((d.min_length for _, d in self._emails), default=0)
        self._r_digits = max((d.reach for _, d in self._digits), default=0)
        self._r_email = max((d.reach for _, d in self._emails), default=0)
        self._r_custom = max((d.reach for _, d in self._customs), default=0)
        self._reach = max(self._r_digits, self._r_email, self._r_custom, 1)
        # Encoded values (views.decoded_views) are found by the built-in detectors, in
        # windows this wide around an escape; one decoded character takes up to MAX_UNIT bytes.
        self._views_on = bool(self._digits or self._emails)
        self._view_radius = _views.MAX_UNIT * max(self._r_digits, self._r_email) + 64
        self._reach_views = _views.MAX_UNIT * self._reach if self._views_on else self._reach
        self._ctx_len = max([BINARY_WINDOW] + [d.behind for d in self.detectors]) + 1
        if hold_limit is None:
            self.escape_gap = DEFAULT_ESCAPE_GAP
        else:
            self.escape_gap = (hold_limit - ESC_MAX) // (self._reach_views + 2) - 1
            if self.escape_gap < 0:
                raise ValueError(f"hold_limit {hold_limit} is too small for these detectors: "
                                 f"at least {self._reach_views + 2 + ESC_MAX} bytes")
        # Stream state.
        self._buf = b""  # held-back original bytes
        self._offset = 0  # offset of _buf[0] in the original stream
        self._ctx = b""  # visible bytes of the open segment just before _buf
        self._gap = 0  # escape bytes since the last visible byte
        self._broken = False  # the segment was already closed during this gap
        self._alt = False  # on the alternate screen (passing through)
        self._ctx_junctions: list[tuple[int, bool]] = []  # junctions (see _Seg) in _ctx, positions in it
        self._firm = False  # a firm escape (_is_firm) since the last visible byte
        self._firm_next = False
        self._live = 0  # bytes at the start of _buf already shown live (release_held)
        self.live_out: bytes | None = None  # what the live view gets of the last output, if not it
        self._split_pending = False  # a value-ending escape came right after a digit
        self._unmasked = 0  # digits split by such an escape since take_unmasked()

    # -- public API ------------------------------------------------------------------------

    @property
    def hold_limit(self) -> int:
        """The most bytes :meth:`feed` ever holds back."""
        return (self._reach_views + 2) * (self.escape_gap + 1) + ESC_MAX

    @property
    def holding(self) -> bool:
        """Bytes are held back: they go out once the bytes after them decide (or at the end)."""
        return bool(self._buf)

    @property
    def held(self) -> int:
        return len(self._buf)

    @property
    def position(self) -> int:
        """Bytes of the original stream emitted (or masked) so far."""
        return self._offset

    def held_text(self) -> bytes:
        """The visible text of the whole held tail (escape sequences and control bytes out)."""
        return _ESC_RE.sub(b"", self._buf).translate(None, _CONTROLS)

    def unshown(self) -> bytes:
        """Held bytes the live view has not had yet (see :meth:`release_held`)."""
        return self._buf[self._live:]

    def release_held(self) -> bytes:
        """The held bytes the live view has not had, for the live view only: the caller has
        established that the reader already knows them (the echo of what it typed). They
        stay held for the masker: what it emits later (the recorded copy) is decided by the
        bytes after them as always, and :attr:`live_out` is then that output without these
        bytes (a value they begin is masked in what follows them)."""
        out = self._buf[self._live:]
        self._live = len(self._buf)
        return out

    def take_unmasked(self) -> int:
        """How many times since the last call an escape sequence that ends values (a cursor
        move, a mode change) came between two digits: a value may have been drawn across it
        and gone out unmasked (docs/masking.md, "unmasked region")."""
        n, self._unmasked = self._unmasked, 0
        return n

    def feed(self, data: bytes) -> tuple[bytes, list[Masked]]:
        """Mask ``data``; returns what may be emitted now and the values masked in it."""
        if not data:
            self.live_out = None
            return b"", []
        self._buf = self._buf + data if self._buf else bytes(data)
        return self._run(final=False)

    def flush(self) -> tuple[bytes, list[Masked]]:
        """Release the held tail: the end of the stream (no byte will come to decide it).

        A flush ends the current segment: a value split across it is not found.
        """
        self.live_out = None
        out = self._run(final=True) if self._buf else (b"", [])
        self._ctx = b""
        self._ctx_junctions = []
        self._gap = 0
        self._broken = False
        self._split_pending = False
        self._firm = False
        self._live = 0
        return out

    # -- one round ------------------------------------------------------------------------

    def _run(self, final: bool) -> tuple[bytes, list[Masked]]:
        buf = self._buf
        self.live_out = None
        plain = (not self._alt and b"\x1b" not in buf and not self._gap and not self._ctx_junctions
                 and not self._live and not self._split_pending and not self._firm)
        if plain and self._engine is not None:
            done = self._run_plain(buf, final)
            if done is not None:
                return done
        if plain:
            ctx = self._ctx
            segs = [_Seg(ctx + buf, len(ctx), [(len(ctx), 0, len(buf))], [len(ctx)], [])]
            tok_end, state = len(buf), (0, False, False, False)
        else:
            segs, tok_end, state = self._tokenize(buf, final)

        edits: list[tuple[int, int, bytes]] = []
        masked: list[Masked] = []
        last = segs[-1]
        d_last = len(last.v)
        for k, seg in enumerate(segs):
            is_last = k == len(segs) - 1
            open_seg = is_last and not final
            limit = self._limit(seg.v, seg.start) if open_seg else len(seg.v)
            found, decided = self._values(seg, limit, open_seg)
            for q, e, rank, digest, rep in found:
                self._place(seg, q, e, self.detectors[rank].name, digest, rep, edits, masked)
            if is_last:
                d_last = decided

        # Where to cut: before the first undecided visible byte of the open segment (never
        # inside a UTF-8 character), or at the end of what was tokenised.
        v = last.v
        if not final:
            d_last = _utf8_boundary(v, d_last, last.start)
        if d_last < len(v):
            cut = last.orig(d_last)
            self._gap, self._broken, self._alt, self._split_pending = 0, False, False, False
            self._firm = False
            lo = max(0, d_last - self._ctx_len)
            self._ctx = v[lo:d_last]
            self._ctx_junctions = [(j - lo, f) for j, f in last.junctions if lo < j <= d_last]
        else:
            cut = tok_end
            self._gap, self._broken, self._alt, self._split_pending = state
            self._firm = self._firm_next if not plain else False
            if state[1] or state[2]:
                self._ctx, self._ctx_junctions = b"", []
            else:
                lo = max(0, len(v) - self._ctx_len)
                self._ctx = v[lo:]
                self._ctx_junctions = [(j - lo, f) for j, f in last.junctions if j > lo]

        if edits:
            parts = []
            pos = 0
            for o, oe, rep in edits:
                parts.append(buf[pos:o])
                parts.append(rep)
                pos = oe
            parts.append(buf[pos:cut])
            out = b"".join(parts)
        else:
            out = buf[:cut] if cut < len(buf) else buf
        if self._live:
            self.live_out = _without_shown(buf, edits, cut, self._live)
            self._live = max(0, self._live - cut)
        self._buf = buf[cut:]
        self._offset += cut
        self._bin_v = None
        return out, masked

    def _values(self, seg: _Seg, limit: int, open_seg: bool) -> tuple[list[tuple[int, int, int, str, bytes]], int]:
        """The values of ``seg`` starting before ``limit`` (v offsets, keyed hash and
        replacement), in order, and the first undecided position: the plain reading's, and
        those of the other readings (views.py) that overlap none of them."""
        found, decided = self._find(seg.v, seg.start, limit)
        if not self._views_on:
            return found, decided
        views: list[tuple[_views.View, bool]] = []
        glue = _views.glue_junctions(seg.v, seg.junctions) if seg.junctions else []
        if glue:
            views.append((_views.split_view(seg.v, glue), False))
        if _views.has_units(seg.v[max(0, seg.start - self._ctx_len):]):
            views += [(w, True) for w in _views.decoded_views(seg.v, self._view_radius, not open_seg)]
        if not views:
            return found, decided
        taken = list(found)
        later: list[tuple[int, int]] = []  # view values that need bytes not decided yet
        holds: list[int] = []  # where a view has undecided starts
        for view, decoded in views:
            text = view.text
            v_start = view.index_at(seg.start)
            if open_seg:
                v_lim = min(view.index_at(limit), view.open_from)
                if view.ends[-1] >= len(seg.v) or view.open_from < len(text):
                    v_lim = min(v_lim, self._limit(text, v_start))
                if v_lim < len(text):
                    holds.append(view.starts[v_lim])
            else:
                v_lim = len(text)
            vals, _ = self._find(text, v_start, v_lim, rep=False)
            for q, e, rank, digest, _rep in vals:
                s, t = view.starts[q], view.ends[e - 1]
                if decoded and not view.has_unit(q - 1, e + 1):  # else the plain reading's
                    continue
                if any(s < oe and o < t for o, oe, *_ in taken):
                    continue
                if t > decided:  # it needs bytes the plain reading has not decided: later
                    later.append((s, t))
                    continue
                det = self.detectors[rank]
                taken.append((s, t, rank, digest, det.replacement.apply(seg.v[s:t])))
        taken.sort()
        # Undecided starts that no value taken covers hold the cut back; a value taken that
        # reaches past the cut moves it to its end (nothing else can start inside it).
        cut = min([decided, *holds, *(s for s, t in later if not any(s < oe and o < t for o, oe, *_ in taken))])
        for o, oe, *_ in taken:
            if o < cut < oe:
                cut = oe
        return [c for c in taken if c[0] < cut], cut

    def _find(self, v: bytes, start: int, limit: int, rep: bool = True) -> tuple[list[tuple[int, int, int, str, bytes]], int]:
        """The plain reading of ``v``: (start, end, rank, keyed hash, replacement) of each
        value starting in v[start:limit], and the first undecided position."""
        if limit <= start:
            return [], start
        if self._engine is not None:
            try:
                decided, values = self._engine.scan(v, start, limit)
                return values, decided
            except RuntimeError:  # pragma: no cover - its backtracking bound: Python decides
                pass
        cands, decided = self._scan(v, start, limit)
        out = []
        for q, me, rank, norm in cands:
            det = self.detectors[rank]
            out.append((q, -me, rank, self._digest(norm), det.replacement.apply(v[q:-me]) if rep else b""))
        return out, decided

    def _run_plain(self, buf: bytes, final: bool) -> tuple[bytes, list[Masked]] | None:
        """_run for plain text, in the compiled engine: the same cut, output and records."""
        assert self._engine is not None
        ctx = self._ctx
        v = ctx + buf if ctx else buf
        start = len(ctx)
        if self._views_on and _views.has_units(v):
            return None  # the other readings may add values: _run merges them
        limit = len(v) if final else self._limit(v, start)
        try:
            out, decided, masked = self._engine.plain(v, start, limit, final, self._offset)
        except RuntimeError:  # pragma: no cover - its backtracking bound: Python decides
            return None
        cut = decided - start
        if decided < len(v):
            self._ctx = v[max(0, decided - self._ctx_len):decided]
        else:
            self._ctx = v[-self._ctx_len:]
        self._gap, self._broken, self._alt = 0, False, False
        self._buf = buf[cut:]
        self._offset += cut
        self._bin_v = None
        return out, masked

    def _apply(self, seg: _Seg, c: _Cand, edits: list[tuple[int, int, bytes]],
               masked: list[Masked]) -> None:
        q, e, rank, norm = c[0], -c[1], c[2], c[3]
        det = self.detectors[rank]
        self._place(seg, q, e, det.name, self._digest(norm), det.replacement.apply(seg.v[q:e]), edits, masked)

    def _place(self, seg: _Seg, q: int, e: int, detector: str, digest: str, rep: bytes,
               edits: list[tuple[int, int, bytes]], masked: list[Masked]) -> None:
        """The edits that put ``rep`` where the visible bytes v[q:e] are, and its record."""
        if len(seg.runs) == 1:  # no escape sequence in the segment: one piece
            v0, o0, _ = seg.runs[0]
            o, oe = o0 + q - v0, o0 + e - v0
            edits.append((o, oe, rep))
        else:
            pieces = seg.pieces(q, e)
            o, oe = pieces[0][0], pieces[-1][1]
            i = 0
            for n, (po, poe) in enumerate(pieces):  # escape sequences inside the value stay
                take = rep[i:] if n == len(pieces) - 1 else rep[i:i + (poe - po)]
                i += len(take)
                edits.append((po, poe, take))
        masked.append(Masked(detector, self._offset + o, oe - o, digest, rep.decode("utf-8", "replace")))

    def _digest(self, norm: str) -> str:
        inner = self._inner.copy()
        inner.update(norm.encode())
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.hexdigest()

    # -- tokenising: visible bytes and escape sequences -------------------------------------

    def _tokenize(self, buf: bytes, final: bool) -> tuple[list[_Seg], int, tuple[int, bool, bool, bool]]:
        gap, broken, alt = self._gap, self._broken, self._alt
        pending = self._split_pending
        max_gap = self.escape_gap
        segs: list[_Seg] = []
        parts = [self._ctx]
        vlen = start = len(self._ctx)
        runs: list[tuple[int, int, int]] = []
        junctions = list(self._ctx_junctions)
        last = self._ctx[-1] if self._ctx else -1

        def close() -> None:
            nonlocal parts, vlen, start, runs, junctions
            segs.append(_Seg(b"".join(parts), start, runs, [r[0] for r in runs], junctions))
            parts, vlen, start, runs, junctions = [], 0, 0, [], []

        firm = self._firm

        def visible(i: int, j: int) -> None:
            nonlocal vlen, gap, broken, pending, last, firm
            if gap and not broken:
                junctions.append((vlen, firm))
            firm = False
            if pending and buf[i] in _VALUE_INSIDE and (0x30 <= buf[i] <= 0x39 or 0x30 <= last <= 0x39):
                self._unmasked += 1
            runs.append((vlen, i, j - i))
            parts.append(buf[i:j])
            vlen += j - i
            gap, broken, pending, last = 0, False, False, buf[j - 1]

        n = len(buf)
        i = 0
        while i < n:
            if alt:
                m = _ALT_EXIT.search(buf, i)
                if m is None:
                    keep = -1 if final else buf.rfind(b"\x1b", max(i, n - 8))
                    end = n if keep < 0 else keep
                    gap += end - i
                    i = end
                    break
                gap += m.end() - i
                i = m.end()
                alt = False
                continue
            j = buf.find(b"\x1b", i)
            if j < 0:
                j = n
            if j > i:
                visible(i, j)
                i = j
                continue
            m = _ESC_RE.match(buf, j)
            if m is not None:
                end = m.end()
                gap += end - j
                if self._pass_alt and end - j <= 8 and buf[j:end] in _ALT_ENTER:
                    alt = True
                    if not broken:
                        close()
                        broken = True
                elif not broken and (gap > max_gap or _is_boundary(buf[j:end])):
                    close()
                    broken = True
                    # A digit on one side, a digit or a value's separator on the other:
                    # one value may be drawn across it (counted as an unmasked region).
                    pending = last in _VALUE_INSIDE
                elif not firm and _is_firm(buf[j:end]):
                    firm = True
                i = end
                continue
            if not final and _ESC_PREFIX.fullmatch(buf, j):
                break  # an escape sequence cut by the end of the data: wait for the rest
            visible(j, j + 1)  # a lone ESC is an ordinary (control) byte
            i = j + 1
        close()
        self._firm_next = firm
        return segs, i, (gap, broken, alt, pending)

    # -- finding values -------------------------------------------------------------------

    def _limit(self, v: bytes, pos: int) -> int:
        """First start in the open segment that more data could still turn into a value.

        A start is decided once every character the patterns could examine from it is
        here (``reach``), or once a character that no value of the family contains comes
        after it (built-in families). Positions where no value can start (a space, a
        digit glued to a letter...) never wait.
        """
        n = len(v)
        u = n
        for reach, family, starts in ((self._r_digits, DIGIT_FAMILY, _NUM_START),
                                      (self._r_email, EMAIL_FAMILY, _EMAIL_START)):
            if reach:
                window = v[max(0, n - reach):]
                run = len(window) - len(window.rstrip(family))
                m = starts.search(v, max(pos, n - run)) if run else None
                u = min(u, max(n - reach + 1, m.start() if m is not None else n))
        if self._r_custom:
            u = min(u, n - self._r_custom + 1)
        return max(u, pos)

    def _scan(self, v: bytes, pos: int, limit: int) -> tuple[list[_Cand], int]:
        """Values starting in v[pos:limit], and the first undecided position."""
        if limit <= pos:
            return [], pos
        room = len(v) - pos
        sources: list[_Source] = []
        if self._union is not None and room >= self._min_digits:
            hs = self._hs_scratch is not None and self._prefilter
            sources.append(_HsDigitSource(self, v, limit) if hs else _DigitSource(self, v, limit))
        if self._email_re is not None and room >= self._min_email and v.find(b"@", pos) >= 0:
            sources.append(_EmailSource(self, v, limit))
        for rank, det in self._customs:
            if room >= det.min_length:
                sources.append(_CustomSource(self, v, limit, rank, det))
        found: list[_Cand] = []
        p = pos
        if len(sources) == 1:
            src = sources[0]
            while (c := src.next(p)) is not None:
                found.append(c)
                p = -c[1]
            return found, max(limit, p)
        while True:
            best: _Cand | None = None
            for src in sources:
                c = src.next(p)
                if c is not None and (best is None or c < best):
                    best = c
            if best is None:
                break
            found.append(best)
            p = -best[1]
        return found, max(limit, p)

    def _binary_before(self, v: bytes, q: int) -> bool:
        if v is not self._bin_v:  # one scan per segment, and only once it has a value
            self._bin_v = v
            self._bin_any = _BINARY.search(v) is not None
        return self._bin_any and _BINARY.search(v, max(0, q - BINARY_WINDOW), q) is not None

    def _best_at(self, v: bytes, q: int, dets: list[tuple[int, Detector]]) -> _Cand | None:
        """The first of ``dets`` (in list order) with a valid value at ``q``."""
        for rank, det in dets:
            r = det.match_at(v, q)
            if r is not None:
                if self._binary_before(v, q):
                    return None
                return (q, -r[0], rank, r[1])
        return None


class _Source:
    def next(self, p: int) -> _Cand | None:
        raise NotImplementedError


class _ZoneSource(_Source):
    """Candidates near cheap "hits"; the regex runs only in small zones around them.

    Invariant: every value starts at most ``width`` bytes before a hit, and no value
    starts in [pos, cursor) except ``cached``.
    """

    width = 0
    reach = 0

    def __init__(self, masker: StreamMasker, v: bytes, limit: int) -> None:
        self.m = masker
        self.v = v
        self.limit = limit
        self.cursor = 0
        self.cached: _Cand | None = None

    def hit(self, cursor: int) -> int:
        raise NotImplementedError

    def candidate(self, m: re.Match[bytes]) -> _Cand | None:
        raise NotImplementedError

    def next(self, p: int) -> _Cand | None:
        cached = self.cached
        if cached is not None:
            if cached[0] >= p:
                return cached
            self.cached = None
        cursor = max(self.cursor, p)
        v, limit, search, width = self.v, self.limit, self.regex.search, self.width
        while True:
            h = self.hit(cursor)
            if h - width >= limit:
                self.cursor = _NONE
                return None
            zs = max(cursor, h - width)
            ze = min(h + _DENSE_ZONE if h <= cursor + 1 else h, limit - 1)
            if zs > ze:
                self.cursor = _NONE
                return None
            # The patterns start with their own boundary look-behinds, so one search in C
            # finds the first start in the zone where one matches. endpos leaves every start
            # up to ze all the characters its patterns may examine.
            endpos = min(len(v), ze + self.reach)
            while (m := search(v, zs, endpos)) is not None and (q := m.start()) <= ze:
                c = self.candidate(m)
                if c is not None:
                    self.cursor = q
                    self.cached = c
                    return c
                zs = q + 1
            cursor = ze + 1

    regex: re.Pattern[bytes]  # all the family's patterns


class _DigitSource(_ZoneSource):
    def __init__(self, masker: StreamMasker, v: bytes, limit: int) -> None:
        super().__init__(masker, v, limit)
        assert masker._union is not None
        self.regex = masker._union
        self.width = masker._w_digits
        self.reach = masker._r_digits
        self.shape = v.translate(SHAPE) if masker._prefilter else b""
        self.hits = [-1, -1, -1, -1, -1]

    def hit(self, cursor: int) -> int:
        """A position inside a possible value, at or after ``cursor`` (see SHAPE)."""
        if not self.m._prefilter:
            return cursor
        shape = self.shape
        hits = self.hits
        if hits[0] < cursor:
            hits[0] = self._long_run(cursor)
        if hits[1] < cursor:  # reported at the first digit: the separator may precede the value
            x = shape.find(_SEP_RUN8, cursor - 1 if cursor else 0)
            hits[1] = x + 1 if x >= 0 else _NONE
        if hits[2] < cursor:
            x = shape.find(_RUN8_SEP, cursor)
            hits[2] = x if x >= 0 else _NONE
        if hits[3] < cursor:
            x = shape.find(_GROUPS4, cursor)
            hits[3] = x if x >= 0 else _NONE
        if hits[4] < cursor:
            m = _CPF_TAIL.search(shape, cursor)
            hits[4] = m.start() if m is not None else _NONE
        return min(hits)

    def _long_run(self, cursor: int) -> int:
        # A run glued to a letter is inside a word (hex ids): values never touch a letter,
        # and a digit run is whole inside any value that holds part of it.
        # bytes.find is fastest where such runs are rare; after one glued run, the regex
        # skips the rest of them in C.
        shape = self.shape
        x = shape.find(_RUN11, cursor)
        if x < 0:
            return _NONE
        end = _RUN_END.match(shape, x).end()  # type: ignore[union-attr]
        if shape[x - 1:x] != b"a" and shape[end:end + 1] != b"a":
            return x
        m = _FREE_RUN11.search(shape, end)
        return m.start() if m is not None else _NONE

    def candidate(self, m: re.Match[bytes]) -> _Cand | None:
        # The union's first matching alternative is the first pattern of detector j that
        # matches here: validate its match directly, the general path only if it fails.
        j = self.m._union_det[m.lastgroup]  # type: ignore[index]
        rank, det = self.m._digits[j]
        norm = det.normalise(m.group())
        q = m.start()
        if norm is None:
            return self.m._best_at(self.v, q, self.m._digits[j:])
        if self.m._binary_before(self.v, q):
            return None
        return (q, -m.end(), rank, norm)


class _HsDigitSource(_DigitSource):
    """_DigitSource with the shape hits of the whole segment from one Hyperscan scan."""

    def __init__(self, masker: StreamMasker, v: bytes, limit: int) -> None:
        _ZoneSource.__init__(self, masker, v, limit)
        assert masker._union is not None
        self.regex = masker._union
        self.width = masker._w_digits
        self.reach = masker._r_digits
        found: list[int] = []
        _hs_database().scan(v, match_event_handler=_on_shape, context=found, scratch=masker._hs_scratch)
        found.sort()  # in order of end offset; the shapes report at different distances from it
        self.found = found

    def hit(self, cursor: int) -> int:
        found = self.found
        i = bisect_left(found, cursor)
        return found[i] if i < len(found) else _NONE


def _on_shape(shape: int, start: int, end: int, flags: int, found: list[int]) -> None:
    found.append(end - _HS_BACK[shape])


@functools.cache
def _hs_database() -> Any:
    """The _HS_SHAPES, compiled once per process (a database is immutable: shared)."""
    db = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    db.compile(expressions=[p for p, _ in _HS_SHAPES], ids=list(range(len(_HS_SHAPES))), flags=0)
    return db


class _EmailSource(_ZoneSource):
    def __init__(self, masker: StreamMasker, v: bytes, limit: int) -> None:
        super().__init__(masker, v, limit)
        assert masker._email_re is not None
        self.regex = masker._email_re
        self.width = 64  # the local part: at most 64 characters before the '@'
        self.reach = masker._r_email
        self.at = -1

    def hit(self, cursor: int) -> int:
        if self.at < cursor:
            x = self.v.find(b"@", cursor)
            self.at = x if x >= 0 else _NONE
        return self.at

    def candidate(self, m: re.Match[bytes]) -> _Cand | None:
        emails = self.m._emails
        if len(emails) > 1:
            return self.m._best_at(self.v, m.start(), emails)
        rank, det = emails[0]  # its patterns are the whole regex: validate the match itself
        norm = det.normalise(m.group())
        q = m.start()
        if norm is None or self.m._binary_before(self.v, q):
            return None
        return (q, -m.end(), rank, norm)


class _CustomSource(_Source):
    def __init__(self, masker: StreamMasker, v: bytes, limit: int, rank: int, det: Detector) -> None:
        self.m = masker
        self.v = v
        self.limit = limit
        self.rank = rank
        self.det = det
        self.cursor = 0
        self.cached: _Cand | None = None

    def next(self, p: int) -> _Cand | None:
        if self.cached is not None:
            if self.cached[0] >= p:
                return self.cached
            self.cached = None
        q0 = max(self.cursor, p)
        v = self.v
        while q0 < self.limit:
            starts = [m.start() for pat in self.det.patterns if (m := pat.search(v, q0)) is not None]
            if not starts or min(starts) >= self.limit:
                break
            q = min(starts)
            r = self.det.match_at(v, q)
            # (a match that starts or ends inside a UTF-8 character fails to decode: refused)
            if r is not None and r[0] > q and not self.m._binary_before(v, q):
                self.cursor = q
                self.cached = (q, -r[0], self.rank, r[1])
                return self.cached
            q0 = q + 1
        self.cursor = _NONE
        return None


def _digit_union(digits: list[tuple[int, Detector]]) -> re.Pattern[bytes]:
    """One regex for all numeric patterns, each in a group named d<detector>p<pattern>."""
    alts = [(b"d%dp%d" % (j, k), p.pattern) for j, (_, d) in enumerate(digits) for k, p in enumerate(d.patterns)]
    pre, post = _NUM_L.encode(), _NUM_R.encode()
    if all(p.startswith(pre) and p.endswith(post) for _, p in alts):
        # The built-ins share their boundary checks: test them once per position, and a
        # value's first character before trying each alternative. Same matches, in C.
        body = b"|".join(b"(?P<%s>%s)" % (n, p[len(pre):len(p) - len(post)]) for n, p in alts)
        return re.compile(pre + b"(?=[0-9(+])(?:" + body + b")" + post)
    return re.compile(b"|".join(b"(?P<%s>%s)" % (n, p) for n, p in alts))


def _is_boundary(seq: bytes) -> bool:
    """Escape sequences that end a value: every CSI but colour (SGR ``m``), cursor-forward
    (``C``) and erase-to-end-of-line (``K``, grep's highlighting), which programs do put
    inside numbers; an OSC (window title, hyperlink), a DCS/APC/PM/SOS string and a reset
    (``ESC c``). A mode change, a line clear or a cursor jump after a value is the end of
    that value, not part of it. The other two-byte escapes (:func:`_is_firm`) and
    character-set designations are read both ways (views.split_view)."""
    if seq[1:2] == b"[":
        return seq[-1:] not in (b"m", b"C", b"K")
    return seq[1:2] in (b"]", b"P", b"_", b"^", b"X", b"c")


def _is_firm(seq: bytes) -> bool:
    """Two-byte escapes other than character-set designations (save/restore cursor
    ``ESC 7``/``ESC 8``, ``ESC M``, ``ESC E``, keypad modes ``ESC =``/``ESC >``, the string
    terminator ``ESC \\``...): a value may end at them whatever follows, or run through
    them (``ESC 7`` moves nothing), so the split view cuts there in every case."""
    return seq[1:2] != b"[" and not (len(seq) == 3 and 0x28 <= seq[1] <= 0x2B)


def _utf8_boundary(v: bytes, d: int, floor: int) -> int:
    """``d``, moved back to the start of a UTF-8 character that v[:d] would cut."""
    for k in (1, 2, 3):
        if d - k < floor:
            return d
        b = v[d - k]
        if b < 0x80:
            return d
        if b >= 0xC0:
            need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return d - k if need > k else d
    return d


_CONTROLS = bytes(range(0x20)) + b"\x7f"
_VALUE_INSIDE = frozenset(b"0123456789.-/")


def _without_shown(buf: bytes, edits: list[tuple[int, int, bytes]], cut: int, shown: int) -> bytes:
    """The output buf[:cut] with ``edits``, less what the live view already has: the first
    ``shown`` original bytes (release_held). A value they begin is masked in the rest."""
    parts = []
    pos = shown
    for o, oe, rep in edits:
        if oe <= shown:
            continue
        if o < shown:
            parts.append(rep[shown - o:] if len(rep) == oe - o else rep)
        else:
            parts.append(buf[pos:o])
            parts.append(rep)
        pos = oe
    if pos < cut:
        parts.append(buf[pos:cut])
    return b"".join(parts)


# A recording's ``masking`` marker: {"type": "masking", "stream": "o", "values": [[detector,
# offset, length, hmac], ...]}, one per output chunk that had values (docs/recording-format.md).
MARKER_FIELDS = ("detector", "offset", "length", "hmac")


def marker_values(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The values of one ``masking`` marker as dicts: MARKER_FIELDS and ``stream``."""
    return [{**dict(zip(MARKER_FIELDS, v, strict=True)), "stream": data.get("stream")} for v in data.get("values", [])]


def mask_bytes(detectors: Sequence[Detector], secret: bytes, data: bytes) -> tuple[bytes, list[Masked]]:
    """Mask a whole byte string (feed + flush)."""
    m = StreamMasker(detectors, secret)
    out, found = m.feed(data)
    tail, more = m.flush()
    return out + tail, found + more
