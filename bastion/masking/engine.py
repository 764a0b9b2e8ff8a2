"""The compiled masking engine (``_engine.c``), and the programs it runs.

The Python masker is the definition of masking; the engine is an accelerator for the
built-in detectors. On plain text (no escape sequence in the chunk, not on the alternate
screen) it finds, validates, replaces and hashes every value in one C call per chunk
(~0.55 µs per value, where Python spends ~7); on a chunk with escape sequences it does the
same for each segment of visible text the Python tokeniser cuts out.

Its patterns are not a second copy: :class:`_Compiler` translates each built-in regular
expression, from the parse tree Python's ``re`` builds, into a small backtracking program
with ``re``'s semantics (ordered alternatives, greedy bounded repetition, look-arounds).
tests/test_masking_engine.py checks each program against ``re`` and the whole engine
against the Python masker, byte for byte and record for record.

The extension is optional: setup.py builds it when a C compiler and OpenSSL's headers are
there (Debian: gcc, python3-dev, libssl-dev), and :func:`build` returns None when it is
not importable, when ``GUARITA_MASKING_ENGINE=python`` is set, or for a configuration it
does not cover (custom detectors); the masker then runs in Python, with the same output.
"""

from __future__ import annotations

import functools
import importlib
import json
import logging
import os
import struct
from collections.abc import Sequence
from re import _constants as _sre  # type: ignore[attr-defined]
from re import _parser as _sre_parse  # type: ignore[attr-defined]
from typing import Any

from bastion.masking.detectors import _NUM_L, BUILTINS, Detector

# The calling convention between this module and _engine.c; a build of another version
# (an in-place build left from before an update) is not used.
ABI = 2

try:
    # By its full name: the compiled leaf module, not the package (whose __init__ imports
    # the masker that imports this module).
    _engine: Any = importlib.import_module("bastion.masking._engine")
except ImportError:  # pragma: no cover - built where a compiler and OpenSSL's headers are
    _engine = None
if _engine is not None and getattr(_engine, "ABI", None) != ABI:  # pragma: no cover
    logging.getLogger(__name__).warning(
        "masking: the compiled engine %s is from another version of guarita; masking runs in Python "
        "until it is rebuilt (pip install .)", _engine.__file__)
    _engine = None

# Tests and benchmarks switch it off to compare with the Python masker.
ENABLED = _engine is not None and os.environ.get("GUARITA_MASKING_ENGINE", "").lower() != "python"

OP_CLASS, OP_SPLIT, OP_JMP, OP_MATCH, OP_LOOK, OP_REP = 1, 2, 3, 4, 5, 6
_KINDS = {"cpf": 0, "cnpj": 1, "card": 2, "phone_br": 3, "phone_e164": 4, "email": 5}
_STYLES = {"redact": 0, "keep_last": 1, "tag": 2, "fixed": 2}
_MAX_DIGIT_DETECTORS = 8


class Unsupported(Exception):
    """A construct the engine's programs do not have (it then leaves masking to Python)."""


class _Compiler:
    """Regular expressions (bytes, no flags) -> one program of int32 words."""

    def __init__(self) -> None:
        self.code: list[int] = []
        self.classes: dict[bytes, int] = {}

    def program(self, pattern: bytes) -> int:
        start = len(self.code)
        self._seq(_sre_parse.parse(pattern, 0))
        self.code.append(OP_MATCH)
        return start

    def first_class(self, pattern: bytes) -> int:
        """A class holding every byte a match of ``pattern`` can start with."""
        return self._class(_first(list(_sre_parse.parse(pattern, 0))))

    def tables(self) -> tuple[bytes, bytes]:
        bitmaps = sorted(self.classes, key=self.classes.__getitem__)
        return struct.pack(f"={len(self.code)}i", *self.code), b"".join(bitmaps)

    def _class(self, members: set[int]) -> int:
        bits = bytearray(32)
        for b in members:
            bits[b >> 3] |= 1 << (b & 7)
        return self.classes.setdefault(bytes(bits), len(self.classes))

    def _seq(self, items: Any) -> None:
        for op, av in items:
            self._item(op, av)

    def _item(self, op: Any, av: Any) -> None:
        code = self.code
        one = _single(op, av)
        if one is not None:
            code += [OP_CLASS, self._class(one)]
        elif op is _sre.SUBPATTERN:
            _group, add_flags, del_flags, sub = av
            if add_flags or del_flags:
                raise Unsupported("inline flags")
            self._seq(sub)
        elif op is _sre.BRANCH:
            self._branch(av[1])
        elif op is _sre.MAX_REPEAT:
            self._repeat(*av)
        elif op in (_sre.ASSERT, _sre.ASSERT_NOT):
            direction, sub = av
            lo, hi = sub.getwidth()
            if direction < 0 and lo != hi:
                raise Unsupported("variable-width look-behind")
            at = len(code)
            code += [OP_LOOK, int(op is _sre.ASSERT_NOT), int(direction < 0), lo, 0]
            self._seq(sub)
            code.append(OP_MATCH)
            code[at + 4] = len(code) - (at + 5)
        else:
            raise Unsupported(str(op))

    def _branch(self, alternatives: list[Any]) -> None:
        code = self.code
        ends = []
        for alt in alternatives[:-1]:
            split = len(code)
            code += [OP_SPLIT, split + 3, 0]
            self._seq(alt)
            ends.append(len(code))
            code += [OP_JMP, 0]
            code[split + 2] = len(code)
        self._seq(alternatives[-1])
        for at in ends:
            code[at + 1] = len(code)

    def _repeat(self, lo: int, hi: int, sub: Any) -> None:
        if hi is _sre.MAXREPEAT or hi > 1000:
            raise Unsupported("unbounded repetition")
        code = self.code
        if len(sub) == 1 and (one := _single(*sub[0])) is not None:
            code += [OP_REP, self._class(one), lo, hi]
            return
        if hi > lo and sub.getwidth()[0] == 0:
            raise Unsupported("repetition of what can match nothing")
        for _ in range(lo):
            self._seq(sub)
        # x{0,n} greedy as nested optionals (x(x(x)?)?)?: each try first, and once one is
        # skipped, the rest are too: re's order of attempts.
        exits = []
        for _ in range(hi - lo):
            split = len(code)
            code += [OP_SPLIT, split + 3, 0]
            exits.append(split)
            self._seq(sub)
        for at in exits:
            code[at + 2] = len(code)


_ALL = frozenset(range(256))


def _first(items: list[Any]) -> set[int]:
    """The bytes a match of the sequence ``items`` can start with (a superset)."""
    out: set[int] = set()
    for op, av in items:
        one = _single(op, av)
        if one is not None:
            return out | one
        if op in (_sre.ASSERT, _sre.ASSERT_NOT):
            continue  # zero width: the next item starts the match
        if op is _sre.SUBPATTERN:
            sub = list(av[3])
        elif op is _sre.BRANCH:
            sub = [(_sre.SUBPATTERN, (None, 0, 0, alt)) for alt in av[1]]
            firsts = set().union(*(_first([b]) for b in sub))
            if any(_sre_parse.SubPattern(_sre_parse.State(), list(alt)).getwidth()[0] == 0 for alt in av[1]):
                out |= firsts
                continue
            return out | firsts
        elif op is _sre.MAX_REPEAT:
            lo, _hi, rep = av
            out |= _first(list(rep))
            if lo > 0 and rep.getwidth()[0] > 0:
                return out
            continue
        else:
            return set(_ALL)
        width = _sre_parse.SubPattern(_sre_parse.State(), sub).getwidth()[0]
        out |= _first(sub)
        if width > 0:
            return out
    return set(_ALL)  # the sequence can match nothing: any byte may follow


def _single(op: Any, av: Any) -> set[int] | None:
    """The bytes one single-character item matches, or None for anything else."""
    if op is _sre.LITERAL:
        return {av}
    if op is _sre.NOT_LITERAL:
        return set(_ALL - {av})
    if op is _sre.ANY:
        return set(_ALL - {10})
    if op is not _sre.IN:
        return None
    members: set[int] = set()
    negate = False
    for iop, iav in av:
        if iop is _sre.NEGATE:
            negate = True
        elif iop is _sre.LITERAL:
            members.add(iav)
        elif iop is _sre.RANGE:
            members.update(range(iav[0], iav[1] + 1))
        elif iop is _sre.CATEGORY:
            members |= _category(iav)
        else:
            raise Unsupported(f"class item {iop}")
    return set(_ALL - members) if negate else members


def _category(cat: Any) -> set[int]:
    # bytes patterns without flags: ASCII classes
    digit = set(range(0x30, 0x3A))
    space = {0x20, 0x09, 0x0A, 0x0B, 0x0C, 0x0D}
    word = digit | set(range(0x41, 0x5B)) | set(range(0x61, 0x7B)) | {0x5F}
    table = {_sre.CATEGORY_DIGIT: digit, _sre.CATEGORY_SPACE: space, _sre.CATEGORY_WORD: word,
             _sre.CATEGORY_NOT_DIGIT: _ALL - digit, _sre.CATEGORY_NOT_SPACE: _ALL - space,
             _sre.CATEGORY_NOT_WORD: _ALL - word}
    if cat not in table:
        raise Unsupported(f"category {cat}")
    return set(table[cat])


def is_builtin(det: Detector) -> bool:
    spec = BUILTINS.get(det.name)
    return (spec is not None and det.normalise is spec.normalise and det.family == spec.family
            and tuple(p.pattern.decode() for p in det.patterns) == spec.patterns)


def build(detectors: Sequence[Detector], secret: bytes, masked_type: type) -> Any | None:
    """An engine for this list of detectors, or None where the Python masker must run."""
    if not ENABLED or not all(is_builtin(d) for d in detectors):
        return None
    try:
        code, classes, pcs, firsts = _programs(tuple(tuple(p.pattern for p in d.patterns) for d in detectors))
    except Unsupported:  # pragma: no cover - the built-ins compile (a test checks)
        return None
    digits: list[tuple[Any, ...]] = []
    email: tuple[Any, ...] | None = None
    for rank, det in enumerate(detectors):
        r = det.replacement
        constant = (r.tag if r.style == "tag" else r.fixed).encode()
        entry = (_KINDS[det.name], rank, pcs[rank], firsts[rank], _STYLES[r.style], r.keep_last, det.name, constant)
        if det.family == "email":
            email = entry
        else:
            digits.append(entry)
    if len(digits) > _MAX_DIGIT_DETECTORS:
        return None
    width = max((d.max_length for d in detectors if d.family == "digits"), default=0)
    return _engine.Engine(code, classes, digits, email, width, secret, masked_type)


@functools.lru_cache(maxsize=64)
def _programs(patterns: tuple[tuple[bytes, ...], ...]) -> tuple[bytes, bytes, list[list[int]], list[list[int]]]:
    """The programs of each detector's patterns (compiled once per configuration: a masker
    is built for every session's output streams), and for each the class of the bytes its
    matches can start with (the engine skips a program that cannot match at a byte).

    The numeric patterns' shared boundary look-behinds (_NUM_L) are left out of their
    programs: the engine tests exactly them once per start, before any program runs."""
    comp = _Compiler()
    num_l = _NUM_L.encode()
    pcs, firsts = [], []
    for pats in patterns:
        pcs.append([comp.program(p[len(num_l):] if p.startswith(num_l) else p) for p in pats])
        firsts.append([comp.first_class(p) for p in pats])
    code, classes = comp.tables()
    return code, classes, pcs, firsts


def marker_values(found: Sequence[Any]) -> tuple[bytes, dict[str, int]]:
    """A ``masking`` marker's ``values`` as JSON text (``[[detector, offset, length, hmac],
    ...]``, MARKER_FIELDS in stream.py), and the count per detector. In C where it is built:
    in a dense log, encoding the marker cost more than finding the values."""
    if _engine is not None:
        try:
            return _engine.marker_values(found)  # type: ignore[no-any-return]
        except ValueError:  # a name that needs escaping: json does it
            pass
    counts: dict[str, int] = {}
    for item in found:
        counts[item[0]] = counts.get(item[0], 0) + 1
    values = [[item[0], item[1], item[2], item[3]] for item in found]
    return json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode(), counts


def compile_patterns(patterns: Sequence[bytes]) -> tuple[Any, list[int]]:
    """An engine holding only these programs (for the tests: ``engine.match(pc, text, pos)``)."""
    comp = _Compiler()
    pcs = [comp.program(p) for p in patterns]
    code, classes = comp.tables()
    return _engine.Engine(code, classes, [], None, 0, b"k", tuple), pcs
