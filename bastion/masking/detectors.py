"""Detectors for personal data in terminal output, and how a found value is replaced.

A :class:`Detector` has a name, one or more compiled ``bytes`` patterns tried at a
candidate start with ``.match()``, the longest value it can match, a validator (check
digits, Luhn, DDD table...) that also normalises the value for the keyed hash, and a
:class:`Replacement` style.

Every built-in pattern is linear: bounded repetition ``{m,n}`` only, no quantifier
inside a repeated group, no backreference. Custom patterns from the configuration are
held to the same rules by :func:`check_pattern` (see ``docs/masking.md``).

Patterns run on the *visible* bytes of a terminal stream (escape sequences removed, see
``bastion.masking.stream``). Built-in patterns are ASCII-only, so bytes of multibyte
UTF-8 characters and invalid UTF-8 never take part in a built-in match.

Built-ins and their default replacement (``redact`` and ``keep_last`` keep the length,
so the terminal layout does not move; ``tag`` and ``fixed`` do not):

=============  ====================================================  ===================
name           matches                                               default style
=============  ====================================================  ===================
cpf            ``000.000.000-00``, ``00000000000``, ``000000000-00``  redact
cnpj           ``00.000.000/0000-00``, 14 digits, partly formatted    redact
card           13-19 digits, or groups split by one space/dash        keep_last 4
phone_br       [+55] (DD) or DD, 8 digits [2-5]... or 9 digits 9...   redact
phone_e164     ``+`` and 8-15 digits                                  redact
email          ``local@domain.tld``                                   redact
=============  ====================================================  ===================
"""

from __future__ import annotations

import hashlib
import hmac
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from re import _constants as _sre  # type: ignore[attr-defined]
from re import _parser as _sre_parse  # type: ignore[attr-defined]
from typing import cast

STYLES = ("redact", "keep_last", "tag", "fixed")
LENGTH_PRESERVING_STYLES = ("redact", "keep_last")

# Limits for custom patterns (and sanity bounds for the built-ins).
MAX_PATTERN_WIDTH = 256
MAX_BACKTRACK_PRODUCT = 100_000
MAX_LOOKBEHIND = 32

_ALNUM_BYTES = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_ALNUM = frozenset(_ALNUM_BYTES)
# Letters, digits and non-ASCII bytes -> '*'; separators unchanged.
_STAR = bytes(0x2A if (b in _ALNUM or b >= 0x80) else b for b in range(256))
_NOT_DIGITS = bytes(b for b in range(256) if not 0x30 <= b <= 0x39)
# Luhn: the doubled digit's digit sum, for '0'..'9'.
_LUHN_DOUBLE = bytes.maketrans(b"0123456789", bytes([0, 2, 4, 6, 8, 1, 3, 5, 7, 9]))
_TAG_TEXT = re.compile(r"^[\x20-\x7e]{1,64}$")


# ---------------------------------------------------------------------------------------
# Replacement styles


@dataclass(frozen=True)
class Replacement:
    """How a found value is shown instead of itself.

    ``redact``     every letter and digit becomes ``*``; separators (``.-/()@ +``) stay:
                   ``123.456.789-09`` -> ``***.***.***-**``. Same length.
    ``keep_last``  like ``redact`` but the last ``keep_last`` letters/digits stay visible
                   (never more than half of them): ``**** **** **** 1111``. Same length.
    ``tag``        a fixed tag such as ``[CPF]``. Length changes.
    ``fixed``      a fixed mask text such as ``***.***.***-**`` whatever the value looked
                   like (hides the format too). Length changes unless it happens to match.
    """

    style: str = "redact"
    keep_last: int = 4
    tag: str = "[MASKED]"
    fixed: str = "****"

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if not 1 <= self.keep_last <= 16:
            raise ValueError(f"keep_last must be 1..16, got {self.keep_last}")
        for what, text in (("tag", self.tag), ("fixed", self.fixed)):
            if not _TAG_TEXT.match(text):
                raise ValueError(f"{what} must be 1-64 printable ASCII characters, got {text!r}")

    @property
    def preserves_length(self) -> bool:
        return self.style in LENGTH_PRESERVING_STYLES

    def apply(self, value: bytes) -> bytes:
        if self.style == "tag":
            return self.tag.encode()
        if self.style == "fixed":
            return self.fixed.encode()
        out = value.translate(_STAR)
        if self.style == "keep_last":
            count = len(value) - len(value.translate(None, _ALNUM_BYTES))
            keep = min(self.keep_last, count // 2)
            if keep:
                buf = bytearray(out)
                i = len(value)
                while keep:
                    i -= 1
                    if value[i] in _ALNUM:
                        buf[i] = value[i]
                        keep -= 1
                out = bytes(buf)
        if not value.isascii():
            # A multibyte character became several '*': drop continuation bytes so one
            # character stays one '*' (its display width in most scripts).
            return _collapse_multibyte(value, out)
        return out


def _collapse_multibyte(original: bytes, masked: bytes) -> bytes:
    res = bytearray()
    for o, m in zip(original, masked, strict=True):
        if 0x80 <= o < 0xC0:  # continuation byte: part of the previous character
            continue
        res.append(m)
    return bytes(res)


# ---------------------------------------------------------------------------------------
# Validators and normalisers: ``bytes -> normalised text`` or None when not a valid value


def _digits(value: bytes) -> str:
    return value.translate(None, _NOT_DIGITS).decode()


def _weighted(digits: str, weights: Sequence[int]) -> int:
    return sum(map(operator.mul, digits.encode(), weights)) - 48 * sum(weights[:len(digits)])


_CPF_W1 = (10, 9, 8, 7, 6, 5, 4, 3, 2)
_CPF_W2 = (11, 10, 9, 8, 7, 6, 5, 4, 3, 2)


def cpf_check_digits(first9: str) -> str:
    d1 = (_weighted(first9, _CPF_W1) * 10 % 11) % 10
    d2 = ((_weighted(first9, _CPF_W2) + 2 * d1) * 10 % 11) % 10
    return f"{d1}{d2}"


# The weights over all the digits (check digits included, weight 0 past the ones summed),
# and 48 x their sum: one C-level pass over the ASCII bytes per check digit.
_CPF_A = (10, 9, 8, 7, 6, 5, 4, 3, 2, 0, 0)
_CPF_B = (11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 0)


def cpf_valid(digits: str) -> bool:
    if len(digits) != 11 or not digits.isdigit() or digits == digits[0] * 11:
        return False
    b = digits.encode()
    d1 = (sum(map(operator.mul, b, _CPF_A)) - 48 * 54) * 10 % 11 % 10
    d2 = (sum(map(operator.mul, b, _CPF_B)) - 48 * 65) * 10 % 11 % 10
    return d1 == b[9] - 48 and d2 == b[10] - 48


_CNPJ_W1 = (5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)
_CNPJ_W2 = (6, 5, 4, 3, 2, 9, 8, 7, 6, 5, 4, 3, 2)


def cnpj_check_digits(first12: str) -> str:
    r = _weighted(first12, _CNPJ_W1) % 11
    d1 = 0 if r < 2 else 11 - r
    r = (_weighted(first12, _CNPJ_W2) + 2 * d1) % 11
    d2 = 0 if r < 2 else 11 - r
    return f"{d1}{d2}"


_CNPJ_A = (*_CNPJ_W1, 0, 0)
_CNPJ_B = (*_CNPJ_W2, 0)


def cnpj_valid(digits: str) -> bool:
    if len(digits) != 14 or not digits.isdigit() or digits == digits[0] * 14:
        return False
    b = digits.encode()
    r1 = (sum(map(operator.mul, b, _CNPJ_A)) - 48 * sum(_CNPJ_W1)) % 11
    r2 = (sum(map(operator.mul, b, _CNPJ_B)) - 48 * sum(_CNPJ_W2)) % 11
    return (0 if r1 < 2 else 11 - r1) == b[12] - 48 and (0 if r2 < 2 else 11 - r2) == b[13] - 48


def luhn_valid(digits: str) -> bool:
    b = digits.encode()
    odd = b[-1::-2]
    even = b[-2::-2]
    return (sum(odd) - 48 * len(odd) + sum(even.translate(_LUHN_DOUBLE))) % 10 == 0


def card_iin_known(digits: str) -> bool:
    """Issuer prefixes of the networks seen in Brazil: Visa, Mastercard (51-55 and
    2221-2720), Amex, Diners, Discover, JCB, Elo, Hipercard, Maestro, UnionPay."""
    d2 = int(digits[:2])
    d4 = int(digits[:4])
    first = digits[0]
    if first == "4":
        return True  # Visa, and Elo's 4xxx ranges
    if first == "5":
        return True  # Mastercard 51-55, Maestro/Elo/Hipercard 50, 56-58
    if first == "6":
        return True  # Discover, Maestro, Elo, Hipercard 606282, UnionPay 62
    if first == "2":
        return 2221 <= d4 <= 2720
    if first == "3":
        return d2 in (34, 36, 37, 38, 39) or 300 <= int(digits[:3]) <= 305 or 3528 <= d4 <= 3589
    return False


def _normalise_cpf(value: bytes) -> str | None:
    d = _digits(value)
    return d if cpf_valid(d) else None


def _looks_like_timestamp(d: str) -> bool:
    """yyyyMMddHHmmss: the shape of compact timestamps in logs (a CNPJ rarely has it)."""
    if len(d) != 14 or d[:2] not in ("19", "20"):
        return False
    mo, dd, hh, mi, ss = int(d[4:6]), int(d[6:8]), int(d[8:10]), int(d[10:12]), int(d[12:14])
    return 1 <= mo <= 12 and 1 <= dd <= 31 and hh < 24 and mi < 60 and ss < 60


def _normalise_cnpj(value: bytes) -> str | None:
    d = _digits(value)
    if not cnpj_valid(d):
        return None
    if value.isdigit() and _looks_like_timestamp(d):
        return None
    return d


def _normalise_card(value: bytes) -> str | None:
    d = _digits(value)
    if not 13 <= len(d) <= 19 or d == d[0] * len(d):
        return None
    return d if card_iin_known(d) and luhn_valid(d) else None


# Brazilian area codes (DDD) in use.
DDD = frozenset(
    [11, 12, 13, 14, 15, 16, 17, 18, 19, 21, 22, 24, 27, 28, 31, 32, 33, 34, 35, 37, 38,
     41, 42, 43, 44, 45, 46, 47, 48, 49, 51, 53, 54, 55, 61, 62, 63, 64, 65, 66, 67, 68, 69,
     71, 73, 74, 75, 77, 79, 81, 82, 83, 84, 85, 86, 87, 88, 89,
     91, 92, 93, 94, 95, 96, 97, 98, 99]
)


def phone_br_e164(digits: str) -> str | None:
    """Digits of a Brazilian number (with or without 55, with or without a trunk 0 before
    the area code) -> ``+55DDNNNNNNNNN``, or None when it is not a valid number."""
    if len(digits) in (12, 13) and digits.startswith("55"):
        digits = digits[2:]
    elif len(digits) in (11, 12) and digits.startswith("0"):
        digits = digits[1:]
    if len(digits) not in (10, 11) or int(digits[:2]) not in DDD:
        return None
    local = digits[2:]
    if len(local) == 9 and local[0] != "9":
        return None
    if len(local) == 8 and local[0] not in "2345":
        return None
    return "+55" + digits


def _normalise_phone_br(value: bytes) -> str | None:
    d = _digits(value)
    if value.isdigit() and len(d) == 10:
        return None  # ten bare digits: too ambiguous (epoch seconds) without any formatting
    return phone_br_e164(d)


def _normalise_e164(value: bytes) -> str | None:
    d = _digits(value)
    if d == d[0] * len(d):
        return None
    return "+" + d


def _normalise_email(value: bytes) -> str | None:
    text = value.decode("ascii")
    local, _, domain = text.rpartition("@")
    if not local or local[0] == "." or local[-1] == "." or ".." in local:
        return None
    if ".." in domain:
        return None
    for label in domain.split("."):
        if not label or len(label) > 63 or label[0] == "-" or label[-1] == "-":
            return None
    return text.lower()


def _normalise_text(value: bytes) -> str | None:
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        return None


# ---------------------------------------------------------------------------------------
# Patterns

# A numeric value starts where no letter, digit, '_' or '+' precedes it, and not right
# after "digit." or "digit-" (the tail of a version string, an IP, a date); it ends where
# no letter, digit or '_' follows, nor ".digit"/"-digit".
_NUM_L = r"(?<![0-9A-Za-z_+])(?<![0-9][.-])"
_NUM_R = r"(?![0-9A-Za-z_])(?![.-][0-9])"

_CPF = [
    r"[0-9]{3}\.[0-9]{3}\.[0-9]{3}-[0-9]{2}",
    r"[0-9]{9}-?[0-9]{2}",
]
_CNPJ = [
    r"[0-9]{2}\.[0-9]{3}\.[0-9]{3}/[0-9]{4}-[0-9]{2}",
    r"[0-9]{8}/?[0-9]{4}-?[0-9]{2}",
]
_CARD = [
    # 19 then 16 digits in groups of four (the longer form first; if it fails Luhn, the
    # 16-digit card in front of an unrelated " 123" is still found).
    r"[2-6][0-9]{3} [0-9]{4} [0-9]{4} [0-9]{4} [0-9]{3}",
    r"[2-6][0-9]{3}-[0-9]{4}-[0-9]{4}-[0-9]{4}-[0-9]{3}",
    r"[2-6][0-9]{3} [0-9]{4} [0-9]{4} [0-9]{4}",
    r"[2-6][0-9]{3}-[0-9]{4}-[0-9]{4}-[0-9]{4}",
    r"3[0-9]{3} [0-9]{6} [0-9]{4,5}",  # Amex 4-6-5, Diners 4-6-4
    r"3[0-9]{3}-[0-9]{6}-[0-9]{4,5}",
    r"[2-6][0-9]{12,18}",
]
_PHONE_BR = [
    r"(?:\+55[ -]?|55[ -])?(?:\(0?[1-9][0-9]\)|0?[1-9][0-9])[ -]?(?:9[ -]?[0-9]{4}|[2-5][0-9]{3})[ -]?[0-9]{4}",
    r"55(?:[1-9][0-9])(?:9[0-9]{4}|[2-5][0-9]{3})[0-9]{4}",
]
_E164 = [r"\+[1-9][0-9]{7,14}"]

_EMAIL_LOCAL = "A-Za-z0-9._%+-"
_EMAIL = (
    rf"(?<![{_EMAIL_LOCAL}])[{_EMAIL_LOCAL}]{{1,64}}@"
    r"[A-Za-z0-9][A-Za-z0-9.-]{0,100}\.[A-Za-z]{2,24}"
    # not followed by more domain, nor by ":path" (git@github.com:org/repo is not a person)
    r"(?![A-Za-z0-9-])(?!\.[A-Za-z0-9])(?!:[^\s])"
)

# Characters a built-in value of each family consists of (plus what its lookahead may
# inspect): used to decide how much of a stream's tail may still become a value.
DIGIT_FAMILY = b"0123456789()+./- "
EMAIL_FAMILY = (b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
                b"._%+-@:")


# ---------------------------------------------------------------------------------------
# Static analysis of patterns


@dataclass
class PatternInfo:
    min_width: int
    max_width: int
    reach: int  # characters examined from a start (match plus lookahead), upper bound
    behind: int  # characters examined before a start (lookbehind), upper bound
    problems: list[str] = field(default_factory=list)


@dataclass
class _Node:
    lo: int = 0
    hi: int = 0
    reach: int = 0
    behind: int = 0
    branches: bool = False
    variable_repeat: bool = False
    product: int = 1


def analyse_pattern(pattern: str) -> PatternInfo:
    """Widths and safety problems of a regular expression (Python syntax)."""
    try:
        parsed = _sre_parse.parse(pattern, 0)
    except re.error as exc:
        return PatternInfo(0, 0, 0, 0, [f"not a valid regular expression: {exc}"])
    problems: list[str] = []
    node = _walk(list(parsed), problems)
    return PatternInfo(node.lo, node.hi, node.reach, node.behind, problems)


def _walk(seq: list[tuple[object, object]], problems: list[str]) -> _Node:
    out = _Node()
    for op, av in seq:
        item = _item(op, av, problems)
        out.reach = max(out.reach, out.hi + item.reach)
        out.behind = max(out.behind, item.behind - out.lo)
        out.lo += item.lo
        out.hi += item.hi
        out.branches |= item.branches
        out.variable_repeat |= item.variable_repeat
        out.product = min(out.product * item.product, 10**12)
    return out


def _item(op: object, av: object, problems: list[str]) -> _Node:
    if op in (_sre.LITERAL, _sre.NOT_LITERAL, _sre.ANY, _sre.IN, _sre.CATEGORY):
        return _Node(1, 1, 1)
    if op is _sre.AT:
        if av in (_sre.AT_BOUNDARY, _sre.AT_NON_BOUNDARY):
            return _Node(reach=1, behind=1)  # \b looks at the characters on both sides
        problems.append("anchors (^, $, \\A, \\Z) are not supported: a terminal stream has no "
                        "fixed start or end; use \\b or look-arounds such as (?<![0-9])")
        return _Node()
    if op is _sre.SUBPATTERN:
        return _walk(list(av[3]), problems)  # type: ignore[index]
    if op is _sre.ATOMIC_GROUP:
        return _walk(list(av), problems)  # type: ignore[call-overload]
    if op is _sre.BRANCH:
        subs = [_walk(list(b), problems) for b in av[1]]  # type: ignore[index]
        return _Node(
            lo=min(s.lo for s in subs), hi=max(s.hi for s in subs),
            reach=max(s.reach for s in subs), behind=max(s.behind for s in subs), branches=True,
            variable_repeat=any(s.variable_repeat for s in subs),
            product=sum(s.product for s in subs),
        )
    if op in (_sre.MAX_REPEAT, _sre.MIN_REPEAT, getattr(_sre, "POSSESSIVE_REPEAT", None)):
        lo, hi, sub = cast(tuple[int, int, list[tuple[object, object]]], av)
        inner = _walk(list(sub), problems)
        if hi is _sre.MAXREPEAT or hi >= 65535:
            problems.append("unbounded repetition (*, +, {n,}): use a bounded {m,n}")
            hi = lo + 1
        if hi > 1 and (inner.lo != inner.hi or inner.branches or inner.variable_repeat):
            problems.append("nested quantifier (a repeated group that itself can match in "
                            "several ways, like (a+)+ or (a|ab){2,5}): catastrophic backtracking risk")
        width_choices = (hi - lo + 1) if inner.lo == inner.hi else 1
        return _Node(
            lo=lo * inner.lo, hi=hi * inner.hi,
            reach=(hi - 1) * inner.hi + inner.reach if hi else 0,
            behind=inner.behind, branches=inner.branches,
            variable_repeat=inner.variable_repeat or lo != hi,
            product=min(_power(inner.product, hi) * width_choices, 10**12),
        )
    if op in (_sre.ASSERT, _sre.ASSERT_NOT):
        direction, sub = cast(tuple[int, list[tuple[object, object]]], av)
        inner = _walk(list(sub), problems)
        if direction == 1:
            return _Node(reach=inner.reach, product=inner.product)
        return _Node(behind=inner.hi, product=inner.product)
    if op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
        problems.append("backreferences are not supported")
        return _Node()
    problems.append(f"unsupported construct {op}")
    return _Node()


def _power(base: int, exp: int) -> int:
    if base <= 1 or exp <= 1:
        return base if exp >= 1 else 1
    return base ** min(exp, 40)


def check_pattern(pattern: str) -> list[str]:
    """Problems that make ``pattern`` unfit for a custom detector (empty list: fine)."""
    if not pattern.isascii():
        return ["must be ASCII (values are matched on the bytes of the stream; write "
                "non-ASCII text with escapes is not supported)"]
    info = analyse_pattern(pattern)
    problems = list(dict.fromkeys(info.problems))
    if problems:
        return problems
    try:
        re.compile(pattern.encode())
    except re.error as exc:
        return [f"not a valid regular expression: {exc}"]
    if info.min_width < 2:
        problems.append("can match fewer than 2 characters (it would mask almost anything)")
    if info.reach > MAX_PATTERN_WIDTH:
        problems.append(f"can match or inspect up to {info.reach} characters; the limit is {MAX_PATTERN_WIDTH}")
    if info.behind > MAX_LOOKBEHIND:
        problems.append(f"looks back {info.behind} characters; the limit is {MAX_LOOKBEHIND}")
    if _product(pattern) > MAX_BACKTRACK_PRODUCT:
        problems.append("too many ways to split a match between its variable-width parts "
                        "(catastrophic backtracking risk): use fixed widths or separators")
    return problems


def _product(pattern: str) -> int:
    return _walk(list(_sre_parse.parse(pattern, 0)), []).product


# ---------------------------------------------------------------------------------------
# Detectors


@dataclass(frozen=True, eq=False)
class Detector:
    """One kind of personal data.

    ``patterns`` are tried in order with ``.match(text, start)``; the first whose match
    passes ``normalise`` (validator: returns the normalised text for the keyed hash, or
    None) wins at that start.
    """

    name: str
    patterns: tuple[re.Pattern[bytes], ...]
    normalise: Callable[[bytes], str | None]
    replacement: Replacement
    family: str  # "digits", "email" or "custom"
    max_length: int
    reach: int
    behind: int
    source: str = ""  # the regular expression, for display
    min_length: int = 1

    def __post_init__(self) -> None:
        # One regex call per candidate start: the alternatives in order, each in a named
        # group so the one that matched is known.
        combined = b"|".join(b"(?P<_p%d>%s)" % (i, p.pattern) for i, p in enumerate(self.patterns))
        object.__setattr__(self, "_combined", re.compile(combined))

    def match_at(self, text: bytes, start: int, endpos: int | None = None) -> tuple[int, str] | None:
        """``(end, normalised)`` of this detector's value starting at ``start``, or None."""
        end_limit = len(text) if endpos is None else endpos
        m = self._combined.match(text, start, end_limit)  # type: ignore[attr-defined]
        if m is None:
            return None
        norm = self.normalise(m.group())
        if norm is not None:
            return m.end(), norm
        first = int(m.lastgroup[2:]) + 1
        for pat in self.patterns[first:]:
            m = pat.match(text, start, end_limit)
            if m is None:
                continue
            norm = self.normalise(m.group())
            if norm is not None:
                return m.end(), norm
        return None

    def with_replacement(self, replacement: Replacement) -> Detector:
        return Detector(self.name, self.patterns, self.normalise, replacement, self.family,
                        self.max_length, self.reach, self.behind, self.source, self.min_length)


@dataclass(frozen=True)
class _Builtin:
    patterns: tuple[str, ...]
    normalise: Callable[[bytes], str | None]
    family: str
    default: Replacement


BUILTINS: dict[str, _Builtin] = {
    "cpf": _Builtin(tuple(_NUM_L + p + _NUM_R for p in _CPF), _normalise_cpf, "digits",
                    Replacement("redact", tag="[CPF]", fixed="***.***.***-**")),
    "cnpj": _Builtin(tuple(_NUM_L + p + _NUM_R for p in _CNPJ), _normalise_cnpj, "digits",
                     Replacement("redact", tag="[CNPJ]", fixed="**.***.***/****-**")),
    "card": _Builtin(tuple(_NUM_L + p + _NUM_R for p in _CARD), _normalise_card, "digits",
                     Replacement("keep_last", keep_last=4, tag="[CARD]", fixed="**** **** **** ****")),
    "phone_br": _Builtin(tuple(_NUM_L + p + _NUM_R for p in _PHONE_BR), _normalise_phone_br, "digits",
                         Replacement("redact", tag="[PHONE]", fixed="(**) *****-****")),
    "phone_e164": _Builtin(tuple(_NUM_L + p + _NUM_R for p in _E164), _normalise_e164, "digits",
                           Replacement("redact", tag="[PHONE]", fixed="+*************")),
    "email": _Builtin((_EMAIL,), _normalise_email, "email",
                      Replacement("redact", tag="[EMAIL]", fixed="***@***")),
}
BUILTIN_NAMES = tuple(BUILTINS)  # also the priority order when two values tie


def _make(name: str, sources: Sequence[str], normalise: Callable[[bytes], str | None],
          family: str, replacement: Replacement) -> Detector:
    infos = [analyse_pattern(s) for s in sources]
    for s, info in zip(sources, infos, strict=True):
        if info.problems:
            raise ValueError(f"pattern {s!r} of detector {name!r}: {'; '.join(info.problems)}")
    return Detector(
        name=name,
        patterns=tuple(re.compile(s.encode()) for s in sources),
        normalise=normalise,
        replacement=replacement,
        family=family,
        max_length=max(i.max_width for i in infos),
        reach=max(i.reach for i in infos),
        behind=max(i.behind for i in infos),
        source="|".join(sources),
        min_length=max(1, min(i.min_width for i in infos)),
    )


def builtin_detector(name: str, *, style: str | None = None, keep_last: int | None = None,
                     tag: str | None = None, fixed: str | None = None) -> Detector:
    """A built-in detector, with its default replacement unless overridden."""
    spec = BUILTINS[name]
    d = spec.default
    repl = Replacement(style or d.style, keep_last if keep_last is not None else d.keep_last,
                       tag if tag is not None else d.tag, fixed if fixed is not None else d.fixed)
    return _make(name, spec.patterns, spec.normalise, spec.family, repl)


def custom_detector(name: str, pattern: str, *, style: str = "redact", keep_last: int = 4,
                    tag: str | None = None, fixed: str = "****") -> Detector:
    """A detector for a configured regular expression; ValueError if the pattern is unsafe."""
    problems = check_pattern(pattern)
    if problems:
        raise ValueError("; ".join(problems))
    repl = Replacement(style, keep_last, tag if tag is not None else f"[{name.upper()}]", fixed)
    return _make(name, [pattern], _normalise_text, "custom", repl)


def default_detectors() -> list[Detector]:
    return [builtin_detector(n) for n in BUILTIN_NAMES]


# ---------------------------------------------------------------------------------------
# Keyed hash


def normalise_value(detector: str, value: str) -> str:
    """The text that is hashed for ``value`` as ``detector`` would have found it.

    ``123.456.789-09`` and ``12345678909`` both give ``12345678909``; phones become
    ``+55DDNNNNNNNNN``; e-mail addresses are lower-cased. ValueError if ``value`` is not a
    valid value for a built-in detector. Custom detectors hash the text as found.
    """
    if detector not in BUILTINS:
        return value
    raw = value.strip().encode()
    if detector == "phone_br":
        norm = phone_br_e164(_digits(raw))
    elif detector == "phone_e164":
        norm = "+" + _digits(raw) if _digits(raw) else None
    elif detector == "email":
        norm = _normalise_email(raw) if raw.isascii() and b"@" in raw else None
    else:
        norm = BUILTINS[detector].normalise(raw)
    if norm is None:
        raise ValueError(f"{value!r} is not a valid {detector} value")
    return norm


def hmac_hex(secret: bytes, normalised: str) -> str:
    return hmac.new(secret, normalised.encode(), hashlib.sha256).hexdigest()


def hmac_value(secret: bytes, detector: str, value: str) -> str:
    """Hex HMAC-SHA256 of ``value`` as it appears in the masking log for ``detector``.

    An auditor holding the gateway secret answers "was this CPF masked in that session?"
    by comparing ``hmac_value(secret, "cpf", "123.456.789-09")`` with the ``hmac`` of the
    session's masking markers.
    """
    return hmac_hex(secret, normalise_value(detector, value))
