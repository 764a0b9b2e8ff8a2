"""What made the recorder cheaper (issue 21) changes no recorded byte: the compiled escaping
writes what json.dumps writes, the short screen tail draws the screen the whole tail draws,
and the event count comes out as before."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from recorder import events as ev
from recorder.snapshot import ScreenTracker, screen_tail

needs_c = pytest.mark.skipif(ev._c_escape is None, reason="recorder/_escape.c is not built")
TERMINAL_CHARS = st.sampled_from(['a', ' ', '"', '\\', '\n', '\r', '\t', '\b', '\f', '\x1b', '\x00', '\x1f', '\x7f',
                                  'é', 'ç', '中', '😀', '~'])


@needs_c
@settings(max_examples=500)
@given(st.text() | st.lists(TERMINAL_CHARS, max_size=200).map("".join))
def test_compiled_escaping_is_what_json_writes(text: str) -> None:
    utf8 = text.encode()
    expected = json.dumps(text, ensure_ascii=False)[1:-1].encode()
    assert ev._c_escape(utf8) == expected
    assert ev.py_json_escape(utf8) == expected


@needs_c
def test_compiled_escaping_of_every_byte_at_every_word_offset() -> None:
    for byte in range(128):
        for offset in range(9):
            text = "x" * offset + chr(byte) + "y" * (16 - offset)
            assert ev._c_escape(text.encode()) == json.dumps(text, ensure_ascii=False)[1:-1].encode()
    clean = b"nothing to escape here, for sure"
    assert ev._c_escape(clean) is clean  # no copy when nothing changes
    bulk = ("\x1b[1mbuild\x1b[m \"ok\" \\ é\r\n" * 20_000)  # 64 KiB and more: escaped without the GIL
    assert ev._c_escape(bulk.encode()) == json.dumps(bulk, ensure_ascii=False)[1:-1].encode()
    assert ev._c_escape(b"a" * 100_000) == b"a" * 100_000


def _screen(data: bytes, cols: int = 80, rows: int = 24) -> tuple[list[str], tuple[int, int]]:
    tracker = ScreenTracker(cols, rows)
    tracker._stream.feed(data)
    screen = tracker._screen
    return list(screen.display), (screen.cursor.x, screen.cursor.y)


def _log(rng: random.Random, lines: int) -> bytes:
    words = ["gcc", "-O2", "\x1b[01;31merror:\x1b[m", "\x1b[32mok\x1b[0m", "warning", "x" * 100, "\t", "50%\r60%",
             "é", "\x1b[K", "\x1b[5G", "\x1b(B\x1b[m"]
    return "".join(" ".join(rng.choice(words) for _ in range(rng.randint(0, 9))) + "\r\n"
                   for _ in range(lines)).encode()


@pytest.mark.parametrize("seed", range(30))
def test_short_screen_tail_draws_the_same_screen(seed: int) -> None:
    rng = random.Random(seed)
    tail = _log(rng, 300) + (b"partial line" if seed % 2 else b"")
    short = screen_tail(tail, 24)
    assert len(short) < len(tail) // 4
    full_display, full_cursor = _screen(tail)
    short_display, short_cursor = _screen(short)
    assert short_cursor == full_cursor
    assert short_display == full_display


@pytest.mark.parametrize("tail", [
    b"line\r\n" * 100 + b"\x1b[5;1Hmoved" + b"\r\nmore" * 10,  # cursor addressing in the rows kept
    b"\x1b[?1049h" + b"line\r\n" * 100,                          # a private mode anywhere
    b"line\n" * 100,                                              # bare LF: the column carries over
    b"line\r\n" * 10,                                             # fewer lines than the screen
])
def test_screen_tail_falls_back_to_the_whole_tail(tail: bytes) -> None:
    assert screen_tail(tail, 24) == tail


def test_event_count_is_one_per_line(tmp_path: Path) -> None:
    """The segment's event count (manifest) is counted per encoded line, not per newline byte."""
    from recorder import Recorder, RecordingKey
    from recorder.store import FileStore
    from replay.reader import iter_events, open_session

    async def run() -> str:
        recorder = Recorder(FileStore(tmp_path / "rec"), tmp_path / "spool",
                            RecordingKey.load_or_create(tmp_path / "key.pem"))
        await recorder.start()
        rec = recorder.open_session({"kind": "shell"}, term=(80, 24))
        rec.output(b"line one\r\nline two\r\n")
        rec.marker("command", command="echo 'a\nb'")
        rec.output(bytes(4096), "e")
        rec.output("ação".encode()[:2])  # a character cut in two: held, then flushed as bytes at the exit
        rec.resize(100, 30)
        rec.exit(0)
        await rec.close()
        assert await recorder.wait_uploaded(30)
        await recorder.close()
        return rec.id

    sid = asyncio.run(run())
    store = FileStore(tmp_path / "rec")
    summary = open_session(store, sid)
    counted = sum(int(s["events"]) for s in summary.manifest["segments"])
    assert counted == len(list(iter_events(store, summary)))


def test_a_closed_session_carries_its_index(tmp_path: Path) -> None:
    """The manifest of a session closed by the gateway holds its archive index entries, so
    indexing it reads one object, not every segment again; a marker after the close (not
    recorded) is not in it."""
    from recorder import Recorder, RecordingKey
    from recorder.store import FileStore
    from replay.index import entry_for
    from replay.reader import open_session

    async def run() -> str:
        recorder = Recorder(FileStore(tmp_path / "rec"), tmp_path / "spool",
                            RecordingKey.load_or_create(tmp_path / "key.pem"))
        await recorder.start()
        rec = recorder.open_session({"kind": "shell"}, term=(80, 24))
        rec.output(b"$ ")
        rec.marker("command", command="ls -la")
        rec.exit(0)
        await rec.close()
        rec.marker("command", command="after the close")
        assert await recorder.wait_uploaded(30)
        await recorder.close()
        return rec.id

    sid = asyncio.run(run())
    store = FileStore(tmp_path / "rec")
    summary = open_session(store, sid)
    index = summary.manifest["index"]
    assert index["complete"] and [c[1] for c in index["commands"]] == ["ls -la"]
    assert [c[1] for c in entry_for(store, summary).commands] == ["ls -la"]


def test_an_exec_sessions_index_matches_the_scan(tmp_path: Path) -> None:
    """The exec command's own marker is not in the index (the metadata has it, at 0.0): the
    entry built from the manifest equals the one built by reading the segments."""
    import dataclasses

    from recorder import Recorder, RecordingKey
    from recorder.store import FileStore
    from replay.index import entry_for
    from replay.reader import open_session

    async def run() -> str:
        recorder = Recorder(FileStore(tmp_path / "rec"), tmp_path / "spool",
                            RecordingKey.load_or_create(tmp_path / "key.pem"))
        await recorder.start()
        rec = recorder.open_session({"kind": "exec", "command": "bash -s"})
        rec.output(b"x")
        rec.marker("command", command="bash -s", mode="exec", outcome="allowed")
        rec.marker("command", command="echo hi", mode="line", outcome="allowed")
        rec.exit(0)
        await rec.close()
        assert await recorder.wait_uploaded(30)
        await recorder.close()
        return rec.id

    sid = asyncio.run(run())
    store = FileStore(tmp_path / "rec")
    summary = open_session(store, sid)
    assert [c[1] for c in summary.manifest["index"]["commands"]] == ["echo hi"]
    carried = entry_for(store, summary)
    scanned = entry_for(store, dataclasses.replace(summary, manifest={
        k: v for k, v in summary.manifest.items() if k != "index"}))
    assert carried.commands == scanned.commands and carried.commands[0] == (0.0, "bash -s")
