"""Property tests of StreamMasker: masking a stream cut anywhere, in any number of pieces,
gives exactly what masking it whole gives; no original value survives; the held-back tail
stays within its bound; UTF-8 characters are never split."""

from __future__ import annotations

import random
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.masking import StreamMasker, custom_detector, default_detectors, hmac_value, samples
from tests.support.masking import feed_in_pieces, prefilter_engine  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("prefilter_engine")

SECRET = b"stream-secret-" + b"y" * 18
DETECTORS = default_detectors() + [
    custom_detector("matricula", r"MAT-[0-9]{6}", style="tag"),
    custom_detector("nome", r"Nome: [^;\n]{2,20}"),  # may match any byte: UTF-8 and binary
]
NAMES = list(samples.GENERATORS)
ESCAPES = [b"\x1b[31m", b"\x1b[0m", b"\x1b[1C", b"\x1b[m\x1b[K", b"\x1b[01;31m\x1b[K", b"\x1b(B",
           b"\x1b[38;2;255;128;0m", b"\x1b7", b"\x1b8"]
_ESC = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[ -/]*[0-~]")

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def values(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(NAMES))
    return name, samples.value(random.Random(draw(st.integers(0, 2**32))), name)


def _with_escapes(draw: st.DrawFn, text: bytes) -> bytes:
    """``text`` with colour codes / cursor movement inserted between some characters."""
    if len(text) < 2 or not draw(st.booleans()):
        return text
    cuts = sorted(set(draw(st.lists(st.integers(1, len(text) - 1), max_size=3))))
    out, prev = [], 0
    for c in cuts:
        out += [text[prev:c], draw(st.sampled_from(ESCAPES))]
        prev = c
    return b"".join(out) + text[prev:]


ATOMS = st.one_of(
    values().map(lambda nv: nv[1].encode()),
    st.sampled_from([
        b" ", b"\n", b"\r\n", b"\t", b".", b"-", b"/", b"@", b"(", b")", b"+", b":", b";", b"_",
        b"abc", b"Z", b"123", b"9999", b"55", b"MAT-", b"2024-01-31", b"192.168.100.200", b"v1.2.3",
        b"git@github.com:org/repo", b"user@", b"example.com", "ção".encode(), "😀".encode(),
        b"\xc3", b"\xa7", b"\xff", b"\x00", b"\x1b", b"\x1b[", b"\x1b[?1049h", b"\x1b[?1049l",
        b"\x1b]0;title\x07", b"\x1b[0m" * 10, b"MAT-123456", b"Nome: ", "José".encode(),
        b"%40", b"%2F", b"%2B", b"%20", b"%", b"%4", b"\\/", b"\\u0040", b"\\u00", b"\\", b"&#64;", b"&#",
        b"\x1b7", b"\x1b8", b"\x1b\\", b"\x1bM", b"\x1b]8;;http://x/\x1b\\", b"\x1b[?25;1049l",
    ]),
    st.sampled_from(ESCAPES),
    st.binary(max_size=6),
)


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    parts = draw(st.lists(ATOMS, min_size=1, max_size=40))
    return b"".join(_with_escapes(draw, p) if draw(st.integers(0, 3)) == 0 else p for p in parts)


def run(data: bytes, cuts: list[int], hold_limit: int | None = None) -> tuple[bytes, list, list[bytes]]:
    m = StreamMasker(DETECTORS, SECRET, hold_limit=hold_limit)
    outs, found = feed_in_pieces(m, data, cuts)
    assert not m.holding
    return b"".join(outs), found, outs


@SETTINGS
@given(data=streams(), seed=st.integers(0, 2**32))
def test_any_chunking_equals_the_whole(data: bytes, seed: int) -> None:
    whole = run(data, [])[:2]
    rng = random.Random(seed)
    for _ in range(3):
        cuts = sorted(rng.sample(range(len(data) + 1), rng.randint(1, min(12, len(data) + 1))))
        assert run(data, cuts)[:2] == whole


@SETTINGS
@given(data=streams())
def test_every_single_cut_point_and_byte_by_byte(data: bytes) -> None:
    whole = run(data, [])[:2]
    for c in range(len(data) + 1):
        assert run(data, [c])[:2] == whole, c
    assert run(data, list(range(1, len(data))))[:2] == whole


@SETTINGS
@given(data=streams(), seed=st.integers(0, 2**32))
def test_small_hold_limit_same_result_and_bound(data: bytes, seed: int) -> None:
    digits_only = [d for d in DETECTORS if d.family != "email"]
    m = StreamMasker(digits_only, SECRET, hold_limit=200)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(data) + 1), min(8, len(data) + 1)))
    out, found, prev = b"", [], 0
    for c in [*cuts, len(data)]:
        o, f = m.feed(data[prev:c])
        out, found, prev = out + o, found + f, c
        assert m.held <= m.hold_limit <= 200
    o, f = m.flush()
    w = StreamMasker(digits_only, SECRET, hold_limit=200)
    wo, wf = w.feed(data)
    wo2, wf2 = w.flush()
    assert (out + o, found + f) == (wo + wo2, wf + wf2)


SEPARATORS = [b" ", b"\n", b" ; ", b", ", b"\t", b" | "]


@SETTINGS
@given(items=st.lists(st.tuples(values(), st.sampled_from(SEPARATORS)), min_size=1, max_size=12),
       seed=st.integers(0, 2**32), data=st.data())
def test_no_original_value_survives(items: list, seed: int, data: st.DataObject) -> None:
    stream = b"".join(_with_escapes(data.draw, v.encode()) + sep for (_, v), sep in items)
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(stream) + 1), min(10, len(stream) + 1)))
    out, found, outs = run(stream, cuts)
    visible = _ESC.sub(b"", out)
    hmacs = {(m.detector, m.hmac) for m in found}
    for (name, value), _ in items:
        assert value.encode() not in visible
        assert _ESC.sub(b"", value.encode()) not in visible
        assert (name, hmac_value(SECRET, name, value)) in hmacs, (name, value)
    assert len(found) == len(items)
    for m in found:  # offset and length locate the value in the original stream
        original = _ESC.sub(b"", stream[m.offset:m.offset + m.length]).decode()
        assert m.hmac == hmac_value(SECRET, m.detector, original)
    for m in found:  # the log holds positions and hashes, never the value
        for (_, value), _ in items:
            assert value not in repr(m)


@SETTINGS
@given(text=st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200),
       seed=st.integers(0, 2**32))
def test_utf8_never_split_between_outputs(text: str, seed: int) -> None:
    data = text.encode()
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(len(data) + 1), min(20, len(data) + 1)))
    out, _, outs = run(data, cuts)
    for piece in outs:
        piece.decode("utf-8")
    assert len(out.decode("utf-8")) <= len(text) + 200  # tags may grow, never garble


@SETTINGS
@given(blob=st.binary(max_size=500), filler=st.text(alphabet=" ;:=abcXYZ", max_size=30),
       cut=st.integers(0, 600))
def test_values_right_after_binary_bytes_are_left_alone(blob: bytes, filler: str, cut: int) -> None:
    # a NUL (or another control byte text does not use) up to 32 bytes before a value:
    # the value sits in binary data and is not rewritten
    data = blob + b"\x00" + filler.encode() + b" 52998224725"
    out, found, _ = run(data, [min(cut, len(data))])
    assert out == data and found == []


# -- the shape pre-filter never hides a value ------------------------------------------------

_REGROUP_SEPS = ["", "", " ", "-", "/", ".", "(", ")", ") ", " (", "+", "  ", "=", ":", "a"]


def _regrouped(rng: random.Random) -> str:
    """The digits of a valid value split into random groups with random separators (and
    prefixes): every grouping the numeric patterns accept turns up, most of them valid."""
    name = rng.choice(["cpf", "cnpj", "card", "phone_br", "phone_e164"])
    digits = re.sub(r"[^0-9]", "", samples.value(rng, name))
    prefix = rng.choice(["", "", "+", "55 ", "+55 ", "0", "(", "+55 (", "55"]) if name.startswith("phone") else ""
    if name == "phone_br" and digits.startswith("55") and rng.random() < 0.5:
        digits = digits[2:]
    out, i = [prefix], 0
    while i < len(digits):
        n = rng.choice([1, 2, 3, 4, 4, 5, 6, 8, 9, 10, 11, 15])
        out.append(digits[i:i + n])
        i += n
        if i < len(digits):
            out.append(rng.choice(_REGROUP_SEPS))
    return "".join(out)


def _stream(rng: random.Random) -> bytes:
    pieces = []
    for _ in range(rng.randint(1, 8)):
        pieces.append(rng.choice([_regrouped(rng), _regrouped(rng), samples.value(rng, rng.choice(NAMES)),
                                  str(rng.randrange(10 ** rng.randint(1, 14))), "ab12", "x=", " ", "-", "\n", "v1.2.3"]))
        pieces.append(rng.choice(["", " ", "=", ", ", "-", "(", ")", "+", "."]))
    return "".join(pieces).encode()


def test_the_engine_under_test_is_the_one_in_use(prefilter_engine: str) -> None:  # noqa: F811
    m = StreamMasker(default_detectors(), SECRET)
    assert (m._hs_scratch is not None) == (prefilter_engine == "hyperscan")
    assert (m._engine is not None) == (prefilter_engine == "compiled")
    assert m._prefilter


def test_shape_prefilter_finds_every_value_the_patterns_find() -> None:
    rng = random.Random(7)
    detectors = default_detectors()
    found_any = 0
    for _ in range(10000):
        data = _stream(rng)
        fast = StreamMasker(detectors, SECRET)
        slow = StreamMasker(detectors, SECRET)
        slow._prefilter = False  # every position is a hit: the patterns alone decide
        slow._engine = None
        expected = slow.feed(data), slow.flush()
        assert (fast.feed(data), fast.flush()) == expected, data
        found_any += len(expected[0][1]) + len(expected[1][1])
    assert found_any > 3000  # the streams do hold values
