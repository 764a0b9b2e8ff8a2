"""replay on generated recordings: seeking, cat, export, search and bad input."""

from __future__ import annotations

import asyncio
import io
import json
import random
import subprocess
import sys
from pathlib import Path

import pyte
import pytest

from recorder import Recorder, RecordingKey
from recorder.segment import segment_name
from recorder.snapshot import SNAPSHOT_QUIET_BYTES
from recorder.store import FileStore, session_prefix
from replay.player import Player
from replay.reader import iter_events, open_session
from replay.search import search_session


def _generate(root: Path, lines: int = 3000, seed: int = 7) -> tuple[str, bytes]:
    """Record a synthetic terminal session (colours, cursor moves, clears, a resize) across many segments."""
    rng = random.Random(seed)
    produced = bytearray()

    async def run() -> str:
        store = FileStore(root / "rec")
        recorder = Recorder(store, root / "spool", RecordingKey.load_or_create(root / "key.pem"),
                            segment_bytes=8192, segment_seconds=60, flush_interval=0.05)
        await recorder.start()
        rec = recorder.open_session({"target": "gen", "kind": "shell", "tty": True,
                                     "term": {"type": "xterm", "cols": 80, "rows": 24}}, term=(80, 24))
        clock = [0.0]
        rec.now = lambda: clock[0]  # type: ignore[method-assign]  # a session of lines/20 seconds
        for i in range(lines):
            clock[0] += 0.05
            kind = rng.random()
            if kind < 0.02:
                chunk = b"\x1b[H\x1b[2J"
            elif kind < 0.05:
                chunk = f"\x1b[{rng.randint(1, 24)};{rng.randint(1, 70)}Hjump-{i}".encode()
            elif kind < 0.3:
                chunk = f"\x1b[3{rng.randint(1, 7)}mcolour line {i}\x1b[0m\r\n".encode()
            else:
                chunk = f"$ ls -l /var/log/item-{i}  size={rng.randint(0, 10**6)}\r\n".encode()
            rec.output(chunk)
            produced.extend(chunk)
            if i % 50 == 0:
                rec.input(b"ls\r")
            if i % 400 == 0:
                rec.marker("command", command=f"cmd-{i}")
            await asyncio.sleep(0)  # let events get distinct times
        rec.exit(0)
        await rec.close()
        assert await recorder.wait_uploaded(10)
        await recorder.close()
        return rec.id

    return asyncio.run(run()), bytes(produced)


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> tuple[FileStore, str, bytes]:
    root = tmp_path_factory.mktemp("replay")
    sid, produced = _generate(root)
    return FileStore(root / "rec"), sid, produced


def _screen_from(data: bytes) -> tuple[list[str], tuple[int, int]]:
    screen = pyte.Screen(80, 24)
    pyte.ByteStream(screen).feed(data)
    return screen.display, (screen.cursor.x, screen.cursor.y)


def test_recording_has_many_segments_and_cat_equals_output(generated: tuple[FileStore, str, bytes]) -> None:
    store, sid, produced = generated
    summary = open_session(store, sid)
    assert len(summary.manifest["segments"]) > 10
    out = b"".join(e.stream_bytes() or b"" for e in iter_events(store, summary) if e.stream == "o")
    assert out == produced


def test_seek_equals_playing_from_start(generated: tuple[FileStore, str, bytes]) -> None:
    store, sid, _ = generated
    summary = open_session(store, sid)
    events = list(iter_events(store, summary))
    duration = events[-1].t
    for fraction in (0.0, 0.13, 0.5, 0.77, 0.999):
        t = duration * fraction
        buf = io.BytesIO()
        Player(store, summary, buf).render_until(t)
        reference = b"".join(e.stream_bytes() or b"" for e in events if e.stream == "o" and e.t < t)
        assert _screen_from(buf.getvalue()) == _screen_from(reference), f"screen differs after seeking to {t}"


def test_seek_reads_only_from_the_covering_segment(generated: tuple[FileStore, str, bytes]) -> None:
    store, sid, _ = generated
    summary = open_session(store, sid)
    player = Player(store, summary, io.BytesIO())
    t = summary.manifest["segments"][-3]["t_start"] + 1e-6
    reads: list[str] = []
    original = store.get
    store.get = lambda key: reads.append(key) or original(key)  # type: ignore[method-assign]
    try:
        player.render_until(t)
    finally:
        del store.get
    # From the last segment with a snapshot on: at most SNAPSHOT_QUIET_BYTES of output after it
    # (recorder/snapshot.py; these segments hold 8 KiB each), and never from segment 0.
    assert reads and not reads[0].endswith(segment_name(0)), reads
    assert len(reads) <= SNAPSHOT_QUIET_BYTES // 8192 + 2, reads


def test_search_reports_offsets_that_play_from_lands_before(generated: tuple[FileStore, str, bytes]) -> None:
    store, sid, produced = generated
    summary = open_session(store, sid)
    import re

    item = re.search(rb"item-1\d{3} ", produced).group().decode()  # type: ignore[union-attr]
    hits = list(search_session(store, summary, re.compile(re.escape(item))))
    assert len(hits) == 1 and item in hits[0].text
    events = list(iter_events(store, summary))
    first = next(e for e in events if e.stream == "o" and item.encode() in (e.stream_bytes() or b""))
    assert hits[0].t == first.t
    commands = list(search_session(store, summary, re.compile("cmd-400"), commands_only=True))
    assert [h.kind for h in commands] == ["command"]


def _replay(*args: str, root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", (root / "rec").as_uri(), *args],
                          capture_output=True, text=True, timeout=60)


def test_cli_ls_cat_export_and_verify(generated: tuple[FileStore, str, bytes], tmp_path: Path) -> None:
    store, sid, produced = generated
    root = store.root.parent
    listing = _replay("ls", "--json", root=root)
    assert listing.returncode == 0, listing.stderr
    assert json.loads(listing.stdout.splitlines()[0])["id"] == sid
    # Store options after the command too, as `bastion serve --dev` prints them.
    after = subprocess.run([sys.executable, "-m", "replay.cli", "ls", "--json", "--recordings", store.url],
                           capture_output=True, text=True, timeout=60)
    assert after.returncode == 0 and sid in after.stdout, after.stderr
    raw = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.url, "cat", "--raw", sid[-8:]],
                         capture_output=True, timeout=60)
    assert raw.returncode == 0 and raw.stdout == produced
    cast = tmp_path / "s.cast"
    exported = _replay("export", sid, "--format", "asciicast-v2", "-o", str(cast), root=root)
    assert exported.returncode == 0, exported.stderr
    lines = cast.read_text().splitlines()
    assert json.loads(lines[0])["version"] == 2
    assert "".join(json.loads(x)[2] for x in lines[1:] if json.loads(x)[1] == "o").encode() == produced
    assert any(json.loads(x)[1] == "m" and "cmd-400" in json.loads(x)[2] for x in lines[1:])
    v3 = _replay("export", sid, "--format", "asciicast-v3", root=root)
    assert json.loads(v3.stdout.splitlines()[0])["term"]["cols"] == 80
    assert json.loads(v3.stdout.splitlines()[-1])[1] == "x"
    verified = _replay("verify", sid, root=root)
    assert verified.returncode == 1 and "UNVERIFIED" in verified.stdout, verified.stdout  # no trusted key
    verified = _replay("verify", sid, "--no-trusted-key", root=root)
    assert verified.returncode == 0 and "OK" in verified.stdout


def test_asciinema_plays_the_export(generated: tuple[FileStore, str, bytes], tmp_path: Path) -> None:
    import shutil

    if not shutil.which("asciinema"):
        pytest.fail("asciinema is not installed (make test installs it)")
    store, sid, produced = generated
    cast = tmp_path / "s.cast"
    assert _replay("export", sid, "-o", str(cast), root=store.root.parent).returncode == 0
    played = subprocess.run(["script", "-qec", f"asciinema play -i 0.001 -s 1000 {cast}", "/dev/null"],
                            capture_output=True, timeout=120)
    assert played.returncode == 0, played.stderr
    assert produced.rstrip()[-40:] in played.stdout  # played to the very end


def test_bad_input_gives_one_line_errors(generated: tuple[FileStore, str, bytes], tmp_path: Path) -> None:
    store, sid, _ = generated
    root = store.root.parent
    unknown = _replay("cat", "20990101-000000-deadbeef", root=root)
    assert unknown.returncode == 1 and "no recording" in unknown.stderr and "Traceback" not in unknown.stderr
    nomatch = _replay("cat", "zzzz", root=root)
    assert nomatch.returncode == 1 and "no recording matches" in nomatch.stderr
    missing_store = subprocess.run([sys.executable, "-m", "replay.cli", "--data-dir", str(tmp_path / "nothing"), "ls"],
                                   capture_output=True, text=True, timeout=60)
    assert missing_store.returncode != 0 and "no recordings" in missing_store.stderr
    bad_from = _replay("play", sid, "--from", "soon", root=root)
    assert bad_from.returncode == 2 and "12m30s" in bad_from.stderr


def test_corrupt_segment_plays_up_to_the_damage(tmp_path: Path) -> None:
    sid, produced = _generate(tmp_path, lines=1200, seed=3)
    store = FileStore(tmp_path / "rec")
    prefix = session_prefix(sid)
    victim = tmp_path / "rec" / prefix / "seg-000002.zst"
    data = victim.read_bytes()
    victim.chmod(0o644)
    victim.write_bytes(data[: len(data) // 2])  # truncated
    result = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.url, "cat", "--raw", sid],
                            capture_output=True, timeout=60)
    assert result.returncode == 1
    assert b"seg-000002.zst" in result.stderr and b"truncated or corrupt" in result.stderr
    assert result.stdout and produced.startswith(result.stdout)
    verify = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.url, "verify", sid],
                            capture_output=True, text=True, timeout=60)
    assert verify.returncode == 1 and "seg-000002.zst" in verify.stdout


def test_live_recording_is_readable_up_to_its_last_segment(tmp_path: Path) -> None:
    async def run() -> tuple[str, FileStore]:
        store = FileStore(tmp_path / "rec")
        recorder = Recorder(store, tmp_path / "spool", RecordingKey.load_or_create(tmp_path / "k.pem"),
                            segment_bytes=4096, flush_interval=0.05)
        await recorder.start()
        rec = recorder.open_session({"target": "live", "kind": "exec"})
        for i in range(500):
            rec.output(f"live line {i}\n".encode())
        rec._cut()  # seal what we have, as the timer would
        await rec.sync()
        assert await recorder.wait_uploaded(10)
        return rec.id, store

    sid, store = asyncio.run(run())
    result = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.url, "cat", sid],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert "live line 499" in result.stdout
    assert "still running or was never sealed" in result.stderr


def test_unreachable_store_is_one_clear_line() -> None:
    import os

    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:1"}
    for args in (["ls"], ["cat", "20261125-000000-deadbeef"], ["verify", "--all"]):
        result = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", "s3://nobucket/p", *args],
                                capture_output=True, text=True, timeout=120, env=env)
        assert result.returncode != 0
        assert "cannot reach http://127.0.0.1:1" in result.stderr and "Traceback" not in result.stderr, result.stderr
