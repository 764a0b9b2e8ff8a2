"""A spool that fills up in the middle of a session, on a real small tmpfs (root only; skipped
with the reason otherwise).

* best_effort: recording stops while the spool refuses writes, resumes by itself once space
  is back, the stretch in between is a ``gap`` marker in the recording and in the manifest,
  ``replay verify`` names it, and the session is sealed at its end.
* strict: the session is told to end; its recording is sealed (with the gap up to the end)
  as soon as the spool takes writes again, without a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from recorder import Recorder, RecordingKey
from recorder.store import FileStore
from replay.reader import iter_events, open_session

META = {"identity": {"subject": "alice"}, "target": "demo", "login": "demo", "kind": "shell", "tty": True,
        "command": None}


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs spool needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, name: str = ".filler") -> Path:
    """Fill the file system of ``folder`` to the last byte."""
    filler = folder / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (65536, 4096, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


async def until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def keep_writing(session: object, done: Callable[[], object], timeout: float = 10) -> None:
    """Incompressible output (the last page of a file may still have room) until ``done``."""
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise AssertionError("the full spool never refused a write")
        session.output(b"during " + os.urandom(4096).hex().encode() + b"\r\n")  # type: ignore[attr-defined]
        await asyncio.sleep(0.01)


def _recorder(tmp_path: Path, spool: Path, policy: str, segment_bytes: int = 64 * 1024) -> Recorder:
    return Recorder(FileStore(tmp_path / "rec"), spool, RecordingKey.load_or_create(tmp_path / "key.pem"),
                    segment_seconds=60, segment_bytes=segment_bytes, flush_interval=0.05, failure_policy=policy)


def _lines(prefix: str, n: int) -> bytes:
    return b"".join(f"{prefix}-{i:04d} {'x' * 60}\r\n".encode() for i in range(n))


def test_best_effort_resumes_marks_the_gap_and_seals(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "spool") as spool:
        async def run() -> str:
            rec = _recorder(tmp_path, spool, "best_effort")
            await rec.start()
            failures: list[Exception] = []
            session = rec.open_session(META, term=(80, 24))
            session.on_failure = failures.append  # best_effort: the front door only logs
            session.output(_lines("before", 50))
            await session.sync()
            filler = fill(spool)
            # Output keeps coming while the spool is full: it cannot be recorded.
            await keep_writing(session, lambda: session.failed is not None)
            filler.unlink()
            await until(lambda: session.failed is None, 10, "recording to resume")
            session.output(_lines("after", 50))
            session.exit(0)
            await session.close()
            assert session.sealed
            assert await rec.wait_uploaded(10)
            await rec.close()
            return session.id

        sid = asyncio.run(run())
    store = FileStore(tmp_path / "rec")
    summary = open_session(store, sid)
    assert summary.complete
    gaps = summary.end["gaps"]
    assert len(gaps) == 1 and gaps[0]["lost_bytes"] > 0 and "No space left" in gaps[0]["reason"], gaps
    assert "index" not in summary.manifest  # markers lost in the gap: the indexer reads the segments
    events = list(iter_events(store, summary))
    out = b"".join(e.stream_bytes() or b"" for e in events if e.stream == "o")
    assert _lines("before", 50) in out and _lines("after", 50) in out
    marks = [i for i, e in enumerate(events) if e.code == "m" and e.data.get("type") == "gap"]
    assert len(marks) == 1
    first_after = next(i for i, e in enumerate(events) if e.stream == "o" and b"after-0000" in (e.stream_bytes() or b""))
    last_before = max(i for i, e in enumerate(events) if e.stream == "o" and b"before-" in (e.stream_bytes() or b""))
    assert last_before < marks[0] < first_after
    # replay verify names the gap, and the recording is whole and signed.
    pub = tmp_path / "key.pub"
    pub.write_text(RecordingKey.load_or_create(tmp_path / "key.pem").public_pem())
    proc = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", store.url, "verify", sid,
                           "--public-key", str(pub)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{sid}: OK") and "GAP" in proc.stdout and "not recorded" in proc.stdout


def test_strict_ends_and_seals_once_space_is_back(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "spool") as spool:
        async def run() -> tuple[str, list[Exception]]:
            # One segment: no upload frees space behind the fillers' back (a cut is uploaded and deleted).
            rec = _recorder(tmp_path, spool, "strict", segment_bytes=64 * 1024 * 1024)
            await rec.start()
            failures: list[Exception] = []
            session = rec.open_session(META, term=(80, 24))
            session.on_failure = failures.append  # strict: the front door ends the session here
            session.output(_lines("before", 50))
            await session.sync()
            assert await rec.wait_uploaded(10)
            filler = fill(spool)
            await keep_writing(session, lambda: failures)
            # Whatever the uploads free is taken too: not even the seal fits.
            assert await rec.wait_uploaded(10)
            second = fill(spool, ".filler2")
            session.exit(None, reason="recording failed")
            await session.close()  # the spool still refuses: it cannot seal yet
            assert not session.sealed
            assert not list((tmp_path / "rec").glob("*/*/*/*/manifest.json"))
            filler.unlink()
            second.unlink()
            await until(lambda: session.sealed, 15, "the seal once space is back (no restart)")
            assert await rec.wait_uploaded(10)
            await rec.close()
            return session.id, failures

        sid, failures = asyncio.run(run())
    assert "No space left" in str(failures[0])
    store = FileStore(tmp_path / "rec")
    summary = open_session(store, sid)
    assert summary.complete and summary.state == "complete"
    events = list(iter_events(store, summary))
    gap = [e.data for e in events if e.code == "m" and e.data.get("type") == "gap"]
    assert len(gap) == 1 and gap[0]["lost_bytes"] > 0
    out = b"".join(e.stream_bytes() or b"" for e in events if e.stream == "o")
    assert out.startswith(_lines("before", 50))
    # Nothing after the failure: the gap runs to the end of the recording.
    at = next(i for i, e in enumerate(events) if e.code == "m" and e.data.get("type") == "gap")
    assert not [e for e in events[at:] if e.stream in ("o", "e", "i")]
    manifest = json.loads((next((tmp_path / "rec").glob("*/*/*/*/manifest.json"))).read_text())
    assert manifest["end"]["gaps"][0]["to"] >= manifest["end"]["gaps"][0]["from"]


# -- through a real gateway, the real ssh client and a real sshd target --------------------------


def _gateway_text(data: Path, spool: Path, policy: str, oidc: Any, targets: Any) -> str:
    from tests.conftest import gateway_config, target_block
    from tests.test_operations import access_block

    t = targets
    text = gateway_config(data, [(oidc.issuer, "5s")],
                          target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key",
                                       t.gateway_key),
                          access_block("sre", ["sre"], ["*"]))
    return text.replace("[recording]\n", f'[recording]\nspool_dir = "{spool}"\nfailure_policy = "{policy}"\n'
                                         'flush_interval = "100ms"\n', 1)


@pytest.mark.parametrize("policy", ["best_effort", "strict"])
def test_gateway_session_with_a_full_spool(policy: str, tmp_path: Path, oidc: Any, targets: Any,
                                           start_gateway: Callable[..., Any]) -> None:
    from tests.support.openssh import run_ssh

    go = Path(tempfile.mkdtemp(prefix="guarita-go-", dir="/tmp"))
    os.chmod(go, 0o777)
    with small_tmpfs(tmp_path / "spool", "4m") as spool:
        data = tmp_path / "gw"
        gw = start_gateway(_gateway_text(data, spool, policy, oidc, targets), data_dir=data)
        mark = gw.audit_mark()
        # Output until the test says go: incompressible, so that the full spool is felt at once.
        script = (f"while [ ! -e {go}/go ]; do head -c 3000 /dev/urandom | base64 -w0; echo; sleep 0.05; done; "
                  "echo after-the-gap")
        result: dict[str, Any] = {}

        def run() -> None:
            result["r"] = run_ssh(["-p", str(gw.ssh_port), f"{targets.login}@web-key@127.0.0.1", script],
                                  token=oidc.token("agent-sre"), timeout=120)

        thread = threading.Thread(target=run)
        thread.start()
        try:
            sid = wait_for_audit(gw, mark, "session.start")
            wait_until(lambda: any(spool.glob(f"{sid}/seg-*")), 20, "the session's first segment")
            filler = fill(spool)
            wait_until(lambda: "cannot reach the spool" in gw.log_text(), 20, "the spool failure in the log")
            filler.unlink()
            if policy == "best_effort":
                wait_until(lambda: "resumes: the spool takes writes again" in gw.log_text(), 20, "the resume")
        finally:
            (go / "go").touch()
            thread.join(120)
        r = result["r"]
        if policy == "best_effort":
            assert r.returncode == 0 and r.stdout.endswith(b"after-the-gap\n"), r.stderr[-500:]
        else:
            assert r.returncode != 0 and b"the recording of this session failed" in r.stderr, r.stderr[-500:]
        # Sealed and uploaded without a restart; the gap is in the recording and named by verify.
        wait_until(lambda: sid in gw.recordings(), 30, "the sealed recording in the store")
        pub = tmp_path / "key.pub"
        pub.write_text(RecordingKey.load_or_create(data / "recording_key.pem").public_pem())
        proc = subprocess.run([sys.executable, "-m", "replay.cli", "--data-dir", str(data), "verify", sid,
                               "--public-key", str(pub)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "GAP" in proc.stdout, proc.stdout + proc.stderr
        store = FileStore(data / "recordings")
        events = list(iter_events(store, open_session(store, sid)))
        assert [e for e in events if e.code == "m" and e.data.get("type") == "gap"]
        out = b"".join(e.stream_bytes() or b"" for e in events if e.stream == "o")
        assert (b"after-the-gap" in out) == (policy == "best_effort")


def wait_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def wait_for_audit(gw: Any, mark: int, event: str) -> str:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [e["session"] for e in gw.audit_events(mark) if e.get("event") == event]
        return bool(found)

    wait_until(seen, 30, event)
    return found[0]
