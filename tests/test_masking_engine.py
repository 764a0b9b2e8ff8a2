"""The compiled masking engine (bastion/masking/_engine.c) against the Python masker.

The Python masker defines masking; the engine must agree with it byte for byte and record
for record. Three levels: each compiled pattern program against ``re`` at every position;
whole streams, chunked at random, through random configurations of the built-in detectors
(subset, order, replacement style); and the switches that decide which one runs.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest

from bastion.masking import (
    StreamMasker,
    builtin_detector,
    custom_detector,
    default_detectors,
    engine,
    samples,
)
from bastion.masking.detectors import BUILTIN_NAMES, BUILTINS
from tests.support.masking import feed_in_pieces

pytestmark = pytest.mark.skipif(engine._engine is None, reason="the compiled masking engine is not built")

SECRET = b"engine-secret-" + b"z" * 18
NAMES = list(samples.GENERATORS)
NOISE = ["", " ", "=", ", ", "-", "(", ")", "+", ".", "/", "@", "_", "a", "Z", ":", "\n", "\t", "0", "55", "..",
         "x.y", "@b.co", "user", ".com", "-1", "ção", "v1.2.3", "192.168.0.1", "2024-01-31", "20240131235959",
         "deadbeef0123456789ab", "git@github.com:org/repo"]


def _digits_regrouped(rng: random.Random) -> str:
    name = rng.choice(["cpf", "cnpj", "card", "phone_br", "phone_e164"])
    digits = re.sub(r"[^0-9]", "", samples.value(rng, name))
    out, i = [rng.choice(["", "", "+", "55 ", "+55 ", "0", "(", "+55 (", "55"])], 0
    while i < len(digits):
        n = rng.choice([1, 2, 3, 4, 4, 5, 6, 8, 9, 11])
        out.append(digits[i:i + n])
        i += n
        if i < len(digits):
            out.append(rng.choice(["", " ", "-", "/", ".", "(", ")", ") ", "+", "  "]))
    return "".join(out)


def _text(rng: random.Random, pieces: int) -> bytes:
    out = []
    for _ in range(pieces):
        r = rng.random()
        if r < 0.35:
            out.append(samples.value(rng, rng.choice(NAMES)))
        elif r < 0.55:
            out.append(_digits_regrouped(rng))
        elif r < 0.65:
            out.append(str(rng.randrange(10 ** rng.randint(1, 20))))
        else:
            out.append(rng.choice(NOISE))
        out.append(rng.choice(NOISE))
    data = "".join(out).encode()
    if rng.random() < 0.15:  # values' characters encoded (percent, JSON escapes...): views.py
        data = re.sub(rb"[@/+ .-]", lambda m: rng.choice(ENCODED.get(m.group(), [m.group()])) if rng.random() < 0.5
                      else m.group(), data)
    if rng.random() < 0.1:  # binary bytes before some values: those must be left alone
        k = rng.randrange(len(data) + 1)
        data = data[:k] + bytes([rng.choice([0, 1, 5, 0x10, 0x1f, 0xff, 0xc3])]) + data[k:]
    return data


ENCODED = {b"@": [b"%40", b"\\u0040", b"&#64;", b"\\x40"], b"/": [b"%2F", b"\\/", b"%2f"],
           b"+": [b"%2B", b"\\u002b"], b" ": [b"%20", b"+", b"\\u0020"], b".": [b"%2E", b"\\u002E"],
           b"-": [b"%2D", b"%"]}


def _config(rng: random.Random) -> list:
    names = rng.sample(BUILTIN_NAMES, rng.randint(1, len(BUILTIN_NAMES)))
    dets = []
    for n in names:
        style = rng.choice([None, "redact", "keep_last", "tag", "fixed"])
        text = rng.choice([None, "#", "[" + "X" * 62 + "]"])  # tags much longer than their values too
        dets.append(builtin_detector(n, style=style, keep_last=rng.randint(1, 8) if style == "keep_last" else None,
                                     tag=text, fixed=text))
    return dets


def _feed(m: StreamMasker, data: bytes, cuts: list[int]) -> tuple[bytes, list]:
    outs, found = feed_in_pieces(m, data, cuts)
    return b"".join(outs), found


def _python(detectors: list) -> StreamMasker:
    m = StreamMasker(detectors, SECRET)
    m._engine = None
    m._prefilter = False  # every start tried: the patterns alone decide
    m._hs_scratch = None
    return m


def test_each_program_matches_like_re() -> None:
    rng = random.Random(11)
    patterns = [p.encode() for spec in BUILTINS.values() for p in spec.patterns]
    eng, pcs = engine.compile_patterns(patterns)
    compiled = [re.compile(p) for p in patterns]
    firsts = [engine._first(list(re._parser.parse(p, 0))) for p in patterns]  # type: ignore[attr-defined]
    checked = matched = 0
    for _ in range(3000):
        text = _text(rng, rng.randint(1, 5))
        for pat, pc, first in zip(compiled, pcs, firsts, strict=True):
            for pos in range(len(text) + 1):
                m = pat.match(text, pos)
                assert eng.match(pc, text, pos) == (m.end() if m else -1), (pat.pattern, text, pos)
                assert m is None or text[pos] in first  # the engine skips programs by first byte
                checked += 1
                matched += m is not None
    assert matched > 1500 and checked > 300_000, (matched, checked)


def test_the_engine_agrees_with_the_python_masker() -> None:
    rng = random.Random(5)
    values = 0
    for i in range(4000):
        dets = default_detectors() if i % 4 == 0 else _config(rng)
        data = _text(rng, rng.randint(1, 12))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 4))))
        fast = StreamMasker(dets, SECRET)
        assert fast._engine is not None
        expected = _feed(_python(dets), data, cuts)
        assert _feed(fast, data, cuts) == expected, (data, cuts, [d.name for d in dets])
        values += len(expected[1])
    assert values > 1500, values


ESCAPES = [b"\x1b[31m", b"\x1b[0m", b"\x1b[1C", b"\x1b[m\x1b[K", b"\x1b[01;31m\x1b[K", b"\x1b(B", b"\x1b[2J",
           b"\x1b[?1049h", b"\x1b[?1049l", b"\x1b]0;title\x07", b"\x1b[0m" * 12, b"\x1b",
           b"\x1b7", b"\x1b8", b"\x1b\\", b"\x1bM", b"\x1bE", b"\x1b=", b"\x1b]8;;https://x.example/\x1b\\",
           b"\x1b[?25;1049l"]


def _coloured(rng: random.Random, data: bytes) -> bytes:
    """``data`` with escape sequences between some bytes, values' insides included."""
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 6)))) if len(data) > 1 else []
    out, prev = [], 0
    for c in cuts:
        out += [data[prev:c], rng.choice(ESCAPES)]
        prev = c
    return b"".join(out) + data[prev:]


def test_text_with_escape_sequences_agrees_too() -> None:
    """Chunks with escape sequences are tokenised in Python and scanned in the engine
    (Engine.scan): colour codes inside values, mode changes, the alternate screen."""
    rng = random.Random(3)
    values = 0
    for i in range(2000):
        dets = default_detectors() if i % 2 == 0 else _config(rng)
        data = _coloured(rng, _text(rng, rng.randint(1, 10)))
        cuts = sorted(rng.sample(range(len(data) + 1), min(len(data) + 1, rng.randint(0, 4))))
        expected = _feed(_python(dets), data, cuts)
        assert _feed(StreamMasker(dets, SECRET), data, cuts) == expected, (data, cuts, [d.name for d in dets])
        values += len(expected[1])
    assert values > 600, values


def test_byte_by_byte_and_whole_agree() -> None:
    rng = random.Random(9)
    data = b" ".join(_text(rng, 4) for _ in range(30))
    m = StreamMasker(default_detectors(), SECRET)
    assert _feed(m, data, list(range(1, len(data)))) == _feed(_python(default_detectors()), data, [])


def test_pathological_input() -> None:
    dets = default_detectors()
    for data in (b"1" * 1_000_000, b"4" + b" 1111" * 200_000, b"a@" * 300_000, b"a" * 2_000_000 + b"@x.com",
                 b"(11) " * 100_000, b"." * 500_000 + b"123.456.789-09"):
        assert _feed(StreamMasker(dets, SECRET), data, [len(data) // 3]) == _feed(_python(dets), data, [len(data) // 3])


def test_which_configurations_use_it() -> None:
    assert StreamMasker(default_detectors(), SECRET)._engine is not None
    # custom detectors: the Python masker
    custom = default_detectors() + [custom_detector("matricula", r"MAT-[0-9]{6}")]
    assert StreamMasker(custom, SECRET)._engine is None
    # a built-in name with other patterns is not a built-in
    cpf = builtin_detector("cpf")
    other = type(cpf)(cpf.name, (re.compile(rb"[0-9]{11}"),), cpf.normalise, cpf.replacement, cpf.family,
                      11, 11, 0)
    assert StreamMasker([other], SECRET)._engine is None


def test_the_environment_switches_it_off() -> None:
    code = "from bastion.masking import engine; print(engine.ENABLED)"
    env = {**os.environ, "GUARITA_MASKING_ENGINE": "python"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    env.pop("GUARITA_MASKING_ENGINE")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_marker_values_are_the_json_of_the_records() -> None:
    import json

    from bastion.masking.stream import Masked
    from recorder import events as ev

    rng = random.Random(2)
    data = b" ".join(_text(rng, 4) for _ in range(50))
    _, found = _feed(StreamMasker(default_detectors(), SECRET), data, [])
    assert found
    odd = found + [Masked('we"ird\\name', 10**12, 3, "ab", "***"), Masked("nome_ção", 1, 2, "cd", "**")]
    for records in (found, odd, []):
        raw, counts = engine.marker_values(records)
        values = [[m.detector, m.offset, m.length, m.hmac] for m in records]
        assert raw == json.dumps(values, ensure_ascii=False, separators=(",", ":")).encode()
        assert counts == {n: sum(1 for m in records if m.detector == n) for n in {m.detector for m in records}}
        fields = {"type": "masking", "stream": "o"}
        assert ev.encode_with_json(1.5, "m", fields, "values", raw) == ev.encode(1.5, "m", {**fields, "values": values})


def test_tags_longer_than_their_values_grow_the_output() -> None:
    rng = random.Random(4)
    tag = "[" + "T" * 62 + "]"
    dets = [builtin_detector(n, style="tag", tag=tag) for n in BUILTIN_NAMES]
    data = " ".join(samples.value(rng, rng.choice(NAMES)) for _ in range(20000)).encode()
    out, found = _feed(StreamMasker(dets, SECRET), data, [len(data) // 2])
    assert (out, found) == _feed(_python(dets), data, [len(data) // 2])
    assert len(out) > 3 * len(data) and len(found) > 19000


def test_the_start_up_log_says_which_engine_masks(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    from bastion.gateway import _log_masking_engine

    caplog.set_level("INFO", logger="guarita")
    _log_masking_engine(default_detectors())
    _log_masking_engine(default_detectors() + [custom_detector("matricula", r"MAT-[0-9]{6}")])
    monkeypatch.setattr(engine, "ENABLED", False)
    _log_masking_engine(default_detectors())
    monkeypatch.setattr(engine, "_engine", None)
    _log_masking_engine(default_detectors())
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines[0] == ("INFO", "masking: compiled engine")
    assert "custom detectors" in lines[1][1]
    assert "GUARITA_MASKING_ENGINE=python" in lines[2][1]
    assert lines[3][0] == "WARNING" and "not built" in lines[3][1]


def test_malformed_programs_are_refused() -> None:
    import struct

    def make(words: list[int], classes: int = 1) -> object:
        return engine._engine.Engine(struct.pack(f"={len(words)}i", *words), bytes(32 * classes), [], None, 0,
                                     b"k", tuple)

    make([engine.OP_CLASS, 0, engine.OP_MATCH])  # fine
    for words in ([engine.OP_CLASS, 5, engine.OP_MATCH], [engine.OP_JMP, 7, engine.OP_MATCH], [99],
                  [engine.OP_SPLIT, 0, 1, engine.OP_MATCH], [engine.OP_LOOK, 0, 0, 0, 9], [engine.OP_REP, 0, 3, 1]):
        with pytest.raises(ValueError, match="malformed program"):
            make(words)
    eng, pcs = engine.compile_patterns([b"[0-9]{3}x"])
    assert eng.match(pcs[0], b"123x", 0) == 4
    with pytest.raises(ValueError):
        eng.match(pcs[0] + 1, b"123x", 0)  # not the start of an instruction


def test_an_engine_error_falls_back_to_python_for_that_chunk() -> None:
    class Failing:
        def plain(self, *args: object) -> None:
            raise RuntimeError("masking engine: backtracking limit")

        scan = plain

    data = b"cpf 529.982.247-25 \x1b[1mmail\x1b[0m ana@example.com\n" * 3 + b"plain 529.982.247-25\n"
    m = StreamMasker(default_detectors(), SECRET)
    m._engine = Failing()
    assert _feed(m, data, [20, 50]) == _feed(_python(default_detectors()), data, [20, 50])


def test_positions_outside_the_text_are_refused() -> None:
    eng = StreamMasker(default_detectors(), SECRET)._engine
    with pytest.raises(ValueError, match="out of range"):
        eng.plain(b"abc", 5, 3, False, 0)
    with pytest.raises(ValueError, match="out of range"):
        eng.scan(b"abc", 0, 9)
