"""Per-segment search summaries (recorder/summary.py): search skips segments and finds the same.

The property that matters: no false negatives. Every hit `replay search` finds reading
every segment, it finds with skipping on, for random text with escape sequences (some
splitting words), multi-byte UTF-8 (some split between reads and between streams), bytes
that are not UTF-8, lines across segment boundaries, command markers, and random
patterns (literals, case-insensitive, alternations, classes, repeats).
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recorder import Recorder, RecordingKey
from recorder import summary as ss
from recorder.store import FileStore, session_prefix
from replay.asciicast import ANSI
from replay.reader import iter_events, iter_segments, open_session
from replay.search import SearchStats, search_session

pytestmark = pytest.mark.skipif(ss._engine is None, reason="the compiled summary (recorder/_summary.c) is not built")

ALPHABET = [b"a", b"B", b"k", b"s", b"i", b"x", b"-", b" ", b"1", b"\n", b"\r", b"\t", b"\x1b", b"[", b"]", b"(",
            b"m", b"0", b";", b"\x07", b"\\", b"H", b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x99\x82", b"\xff",
            b"\xe2", b"\xe2\x82", b"\x82", b"\x82\xac", b"\xac", b"\x1b[1m", b"\x1b[0m", b"\x1b]0;title\x07", b"\x1b(B", b"word", b"Error", b"\xc5\xbf"]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(ALPHABET), max_size=60), st.booleans(), st.integers(0, 12))
def test_the_compiled_filter_marks_what_the_python_definition_marks(parts: list[bytes], strip: bool,
                                                                     limit: int) -> None:
    data = b"".join(parts) * 3  # long enough for the 8-byte loads
    ours, theirs = bytearray(ss.TABLE_SIZE), bytearray(ss.TABLE_SIZE)
    assert ss._engine.add(ours, data, strip, limit) == ss.add_py(theirs, data, strip, limit)
    assert ours == theirs


# -- the property: the same hits with and without skipping ---------------------------------------

# One step of a session: output on o or e, a command marker, or a segment cut.
_chunk = st.lists(st.sampled_from(ALPHABET), min_size=1, max_size=12).map(b"".join)
_step = st.one_of(
    st.tuples(st.sampled_from(["o", "o", "o", "e"]), _chunk),
    st.tuples(st.just("cmd"), st.lists(st.sampled_from(["ls", " -la ", "kubectl", "\x1b[1m", "é", "sudo"]),
                                       max_size=4).map("".join).map(str.encode)),
    st.tuples(st.just("cut"), st.just(b"")),
    st.tuples(st.just("tick"), st.just(b"")),
)
_literal = st.lists(st.sampled_from(["a", "B", "k", "s", "i", "x", "-", " ", "1", "é", "€", "word", "Error", "ſ",
                                     "title"]), min_size=1, max_size=4).map("".join)


@st.composite
def _patterns(draw: st.DrawFn, produced: str) -> re.Pattern[str]:
    """A literal (often cut out of what was printed, so that there are hits) in some regex."""
    if produced and draw(st.booleans()):
        start = draw(st.integers(0, len(produced) - 1))
        literal = produced[start:start + draw(st.integers(1, 8))]
    else:
        literal = draw(_literal)
    other = draw(_literal)
    shape = draw(st.sampled_from(["{l}", "{l}", "{l}|{o}", "({l})+x?", "[a-z]{l}", "{l}.*{o}", "(?:{l}|{o})s",
                                  "(?i:{l})", "{l}\\b", "^{l}", "{l}{{2}}", "(?={l}){l}"]))
    flags = draw(st.sampled_from([0, re.IGNORECASE]))
    return re.compile(shape.format(l=re.escape(literal), o=re.escape(other)), flags)


def _record(root: Path, steps: list[tuple[str, bytes]]) -> tuple[FileStore, str]:
    async def run() -> str:
        store = FileStore(root / "rec")
        recorder = Recorder(store, root / "spool", RecordingKey.load_or_create(root / "key.pem"),
                            segment_seconds=3600, flush_interval=3600)
        await recorder.start()
        rec = recorder.open_session({"target": "prop", "kind": "shell", "tty": False})
        clock = [0.0]
        rec.now = lambda: clock[0]  # type: ignore[method-assign]  # reads merge into one event, or not
        for kind, data in steps:
            if kind == "cut":
                rec._cut()
            elif kind == "tick":
                clock[0] += 0.01
            elif kind == "cmd":
                rec.marker("command", command=data.decode(), mode="interactive")
            else:
                rec.output(data, kind)
        rec.exit(0)
        await rec.close()
        assert await recorder.wait_uploaded(10)
        await recorder.close()
        return rec.id

    return FileStore(root / "rec"), asyncio.run(run())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(steps=st.lists(_step, min_size=1, max_size=40), data=st.data())
def test_skipping_finds_every_hit_a_full_scan_finds(tmp_path_factory: pytest.TempPathFactory,
                                                     steps: list[tuple[str, bytes]], data: st.DataObject) -> None:
    store, sid = _record(tmp_path_factory.mktemp("prop"), steps)
    summary = open_session(store, sid)
    assert all("summary" in s for s in summary.manifest["segments"])  # type: ignore[index]
    # What search sees: the recorded events (a character split between reads is recorded
    # whole, after output of the other stream read meanwhile), decoded one by one.
    produced = ANSI.sub("", "".join((e.stream_bytes() or b"").decode("utf-8", "replace")
                                    for e in iter_events(store, summary) if e.stream in ("o", "e")))
    for _ in range(5):
        pattern = data.draw(_patterns(produced))
        for commands_only in (False, True):
            full = list(search_session(store, summary, pattern, commands_only, skip=False))
            skipping = list(search_session(store, summary, pattern, commands_only, skip=True))
            assert skipping == full, pattern


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(steps=st.lists(_step, min_size=1, max_size=40))
def test_every_piece_of_every_line_passes_the_filter_of_its_segment(tmp_path_factory: pytest.TempPathFactory,
                                                                    steps: list[tuple[str, bytes]]) -> None:
    """The same property one level down, where a filter's false positives cannot hide a miss:
    every substring of every line (as search sees it) and of every command passes the filter
    of the segment the line ends in."""
    store, sid = _record(tmp_path_factory.mktemp("filters"), steps)
    summary = open_session(store, sid)
    records = summary.manifest["segments"]  # type: ignore[index]
    line: list[str] = []
    k = 0
    for k, events in iter_segments(store, summary):
        for event in events:
            if event.code == "m" and event.data.get("type") == "command":
                _all_pieces_pass(str(event.data.get("command", "")), records[k]["summary"])
            elif event.stream in ("o", "e"):
                for piece in re.split(r"(\n)", (event.stream_bytes() or b"").decode("utf-8", "replace")):
                    if piece == "\n":
                        _all_pieces_pass(ANSI.sub("", "".join(line)), records[k]["summary"])
                        line = []
                    else:
                        line.append(piece)
    _all_pieces_pass(ANSI.sub("", "".join(line)), records[k]["summary"])


def _all_pieces_pass(text: str, summary: dict[str, object]) -> None:
    for size in (4, 5, 7):
        for at in range(max(0, len(text) - size + 1)):
            piece = text[at:at + size]
            assert ss.may_match(summary, ss.required(re.compile(re.escape(piece)))), (piece, text)


def test_a_character_split_between_reads_is_summarised_where_it_is_recorded(tmp_path: Path) -> None:
    # The encoder holds the cut character until the next stdout read: it is recorded after
    # the stderr read in between, so the line search sees is "abcd€z".
    store, sid = _record(tmp_path, [("o", b"ab\xe2"), ("e", b"cd"), ("o", b"\x82\xacz\n"), ("cut", b""),
                                    ("o", b"other\n")])
    summary = open_session(store, sid)
    for text in ("bcd\u20ac", "cd\u20acz", "abcd"):  # four bytes or more: see summary._holds
        stats = SearchStats()
        hits = list(search_session(store, summary, re.compile(re.escape(text)), stats=stats))
        assert [h.text for h in hits] == ["abcd\u20acz"] and stats.skipped == 1, text


def test_a_line_longer_than_search_matches_whole_is_never_skipped(tmp_path: Path) -> None:
    long_line = b"".join(b"chunk-%06d \x1b[1m" % i for i in range(8000))  # 120 KiB, no newline
    steps = [("o", b"before\n"), ("cut", b""), ("o", long_line[:50000]), ("cut", b""), ("o", long_line[50000:]),
             ("cut", b""), ("o", b" end\nafter\n"), ("cut", b""), ("o", b"quiet\n")]
    store, sid = _record(tmp_path, steps)
    summary = open_session(store, sid)
    marks = [s["summary"] for s in summary.manifest["segments"]]  # type: ignore[index]
    # segment 1 holds 50,000 bytes of it (matched whole so far); 2 and 3 the rest
    assert [m.get("all", False) for m in marks][:4] == [False, False, True, True]
    for text in ("chunk-007999", "1mchunk", "end", "quiet", "before"):
        pattern = re.compile(re.escape(text))
        stats = SearchStats()
        assert list(search_session(store, summary, pattern, stats=stats)) == \
            list(search_session(store, summary, pattern, skip=False)), text
    stats = SearchStats()
    assert [h.text for h in search_session(store, summary, re.compile("quiet"), stats=stats)] == ["quiet"]
    assert stats.skipped >= 1


# -- what a pattern requires -------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "flags", "expected"), [
    ("needle", 0, ("and", (b"needle",))),
    ("(?i)ERROR: disk", 0, ("and", (b"ERROR: d",))),  # i, s and k also match non-ASCII letters
    ("Error|warn", 0, ("and", (("or", (("and", (b"Error",)), ("and", (b"warn",)))),))),
    ("a.*b", 0, ("and", (b"a", b"b"))),
    ("x(yz)+w", 0, ("and", (b"x", ("and", (b"yz",)), b"w"))),
    ("caf\u00e9", re.IGNORECASE, ("and", (b"caf",))),
    ("caf\u00e9", 0, ("and", ("caf\u00e9".encode(),))),
    ("[ab]+", 0, ss.TRUE),
    ("x*", 0, ss.TRUE),
])
def test_required_literals(pattern: str, flags: int, expected: object) -> None:
    assert ss.required(re.compile(pattern, flags)) == expected


def test_manifests_without_summaries_are_read_whole() -> None:
    segments = [{"index": 0, "sha256": "0" * 64}, {"index": 1, "sha256": "1" * 64}]
    assert ss.read_plan(segments, re.compile("needle")) is None


# -- the summary is signed: verify catches an altered one --------------------------------------


def test_an_altered_summary_fails_verify(tmp_path: Path) -> None:
    store, sid = _record(tmp_path, [("o", b"alpha\n"), ("cut", b""), ("o", b"beta\n")])
    path = store.root / (session_prefix(sid) + "manifest.json")  # type: ignore[attr-defined]
    ok = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.root.as_uri(), "verify", sid,
                         "--public-key", str(_public_key(tmp_path))], capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    manifest = json.loads(path.read_text())
    manifest["segments"][1]["summary"] = {"format": ss.FORMAT, "from": 1, "bits": 64, "bloom": "AAAAAAAAAAA="}
    path.chmod(0o600)
    path.write_text(json.dumps(manifest))
    bad = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.root.as_uri(), "verify", sid,
                          "--public-key", str(_public_key(tmp_path))], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "signature" in (bad.stdout + bad.stderr).lower(), bad.stdout + bad.stderr


def _public_key(root: Path) -> Path:
    out = root / "recording.pub"
    if not out.exists():
        out.write_text(RecordingKey.load_or_create(root / "key.pem").public_pem())
    return out


@given(st.lists(st.integers(0, ss.TABLE_SIZE - 1), max_size=20000), st.integers(0, 3))
@settings(max_examples=60, deadline=None)
def test_the_compiled_fold_is_the_python_one(bits: list[int], spread: int) -> None:
    table = bytearray(ss.TABLE_SIZE)
    for bit in bits:
        table[bit >> spread] = 1
    assert ss._fold(table) == ss._fold_python(table)
