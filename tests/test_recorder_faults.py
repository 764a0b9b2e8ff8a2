"""The recorder against S3 with Object Lock (a real ``moto_server``): verification, tampering,
an S3 outage in the middle of a session, a full spool, and a SIGKILLed recorder process.

No SSH here: sessions are fed straight into ``Recorder``/``SessionRecording``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import random
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from recorder import Recorder, RecordingKey
from recorder.recorder import CONFLICTS_DIR
from recorder.s3store import S3Store
from recorder.segment import segment_name
from recorder.store import FileStore, StoreError, session_prefix
from replay.reader import iter_events, open_session
from replay.verify import verify_session
from tests.test_s3store import REPO, MotoServer, set_aws_env, wait_for

META = {"identity": {"subject": "alice", "email": "alice@example.com"}, "target": "demo", "login": "demo",
        "kind": "shell", "tty": True, "command": None}
RETENTION = 3600.0


def new_key(path: Path) -> RecordingKey:
    return RecordingKey.load_or_create(path)


async def await_until(predicate: Callable[[], object], timeout: float, what: str) -> None:
    """Poll ``predicate`` from the event loop (the recorder keeps running) until it holds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def record_session(store, spool: Path, key: RecordingKey, *, lines: int = 150,
                         session_id: str | None = None) -> tuple[str, bytes]:
    """One terminal session cut into several segments; returns (id, every output byte)."""
    rec = Recorder(store, spool, key, segment_seconds=60, segment_bytes=2048, flush_interval=0.05)
    await rec.start()
    session = rec.open_session(META, term=(80, 24), session_id=session_id)
    out = []
    for i in range(lines):
        data = f"{i:05d} {secrets.token_hex(20)}\r\n".encode()
        session.output(data)
        out.append(data)
        if i % 10 == 0:
            session.input(b"ls\r")
            await asyncio.sleep(0)  # let the spool work run, as a live relay would
    session.resize(100, 30)
    session.marker("command", text="ls")
    session.exit(0)
    await session.close()
    assert await rec.wait_uploaded(30), "uploads did not drain"
    await rec.close()
    return session.id, b"".join(out)


def output_of(store, sid: str) -> bytes:
    summary = open_session(store, sid)
    return b"".join(e.stream_bytes() or b"" for e in iter_events(store, summary) if e.stream == "o")


def verify(store, sid: str, key: RecordingKey | None, lock_mode: str | None = None):
    return verify_session(store, open_session(store, sid), key.public_raw if key else None, lock_mode)


def replay_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "replay.cli", *args], cwd=REPO, env=os.environ.copy(),
                          capture_output=True, text=True, timeout=60)


# -- a whole session on S3 verifies ---------------------------------------------------------------


def test_session_on_s3_verifies_with_lock_and_retention(s3env: MotoServer, tmp_path: Path) -> None:
    bucket = s3env.make_bucket()
    url = f"s3://{bucket}/recordings"
    store = S3Store.from_url(url, lock_mode="COMPLIANCE", retention=RETENTION)
    assert store.check() == []
    key = new_key(tmp_path / "recording_key.pem")
    sid, written = asyncio.run(record_session(store, tmp_path / "spool", key))

    prefix = session_prefix(sid)
    keys = list(store.list(prefix))
    segments = [k for k in keys if k[len(prefix):].startswith("seg-")]
    assert len(segments) >= 4, keys
    assert prefix + "start.json" in keys and prefix + "manifest.json" in keys
    now = datetime.now(UTC)
    for k in keys:
        info = store.head(k)
        assert info.lock_mode == "COMPLIANCE", k
        assert RETENTION - 120 < (info.retain_until - now).total_seconds() <= RETENTION, k
    assert output_of(store, sid) == written

    result = verify(store, sid, key, "COMPLIANCE")
    assert result.ok, result.problems
    assert result.segments == len(segments) and result.warnings == []
    wrong_mode = verify(store, sid, key, "GOVERNANCE")
    assert wrong_mode.problems == ["start.json: lock mode COMPLIANCE, expected GOVERNANCE"]

    pem = tmp_path / "recording.pub"
    pem.write_text(key.public_pem())
    proc = replay_cli("--recordings", url, "verify", sid, "--public-key", str(pem), "--lock-mode", "COMPLIANCE")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == f"{sid}: OK ({len(segments)} segments)"
    proc = replay_cli("--recordings", url, "verify", sid, "--public-key", str(pem), "--lock-mode", "GOVERNANCE")
    assert proc.returncode == 1
    assert proc.stdout.strip() == f"{sid}: FAILED: start.json: lock mode COMPLIANCE, expected GOVERNANCE"
    # The spool is empty again, and the tracked size agrees with the disk.
    assert list((tmp_path / "spool").iterdir()) == []


# -- tampering --------------------------------------------------------------------------------------


class Tamper:
    """Changes one recording behind the store's back: S3 objects under GOVERNANCE (deleted with the
    governance bypass, then rewritten), or files of a local copy."""

    def __init__(self, store, sid: str, moto: MotoServer | None) -> None:
        self.store, self.prefix, self.moto = store, session_prefix(sid), moto

    def read(self, name: str) -> bytes:
        return self.store.get(self.prefix + name)

    def delete(self, name: str) -> None:
        if isinstance(self.store, FileStore):
            (self.store.root / self.prefix / name).unlink()
            return
        client, key = self.moto.client(), self.store.prefix + self.prefix + name
        versions = client.list_object_versions(Bucket=self.store.bucket, Prefix=key)
        for v in versions.get("Versions", []) + versions.get("DeleteMarkers", []):
            if v["Key"] == key:
                client.delete_object(Bucket=self.store.bucket, Key=key, VersionId=v["VersionId"],
                                     BypassGovernanceRetention=True)

    def write(self, name: str, data: bytes, *, locked: bool = True) -> None:
        self.delete(name)
        if isinstance(self.store, FileStore) or locked:
            self.store.put(self.prefix + name, data)  # with the same lock and retention as the original
        else:
            self.moto.client().put_object(Bucket=self.store.bucket, Key=self.store.prefix + self.prefix + name,
                                          Body=data)


@pytest.fixture(scope="module")
def pristine(moto: MotoServer, tmp_path_factory: pytest.TempPathFactory):
    """One recorded session in a GOVERNANCE bucket; each test tampers with a copy of it."""
    tmp = tmp_path_factory.mktemp("pristine")
    with pytest.MonkeyPatch.context() as mp:
        set_aws_env(mp, moto.url, tmp)
        store = S3Store.from_url(f"s3://{moto.make_bucket()}/rec", lock_mode="GOVERNANCE", retention=RETENTION)
        key = new_key(tmp / "recording_key.pem")
        sid, _ = asyncio.run(record_session(store, tmp / "spool", key))
        objects = {k: store.get(k) for k in store.list(session_prefix(sid))}
    return sid, key, objects


def _copy(kind: str, moto: MotoServer, tmp: Path, objects: dict[str, bytes]):
    if kind == "s3-governance":
        store = S3Store.from_url(f"s3://{moto.make_bucket()}/rec", lock_mode="GOVERNANCE", retention=RETENTION)
    else:
        store = FileStore(tmp / "copy")
    for k, data in objects.items():
        store.put(k, data)
    return store


def _resign(manifest: bytes, signer: RecordingKey, edit: Callable[[dict], None] | None = None) -> bytes:
    body = json.loads(manifest)
    body.pop("signature")
    if edit:
        edit(body)
    body["key_id"] = signer.key_id
    body["public_key"] = base64.b64encode(signer.public_raw).decode()
    return json.dumps({**body, "signature": signer.sign(body)}).encode()


def _drop_last_segment(body: dict) -> None:
    body["segments"].pop()


def _flip_byte(t: Tamper) -> None:
    data = bytearray(t.read("seg-000001.zst"))
    data[len(data) // 2] ^= 0x01
    t.write("seg-000001.zst", bytes(data))


def _swap(t: Tamper) -> None:
    one, two = t.read("seg-000001.zst"), t.read("seg-000002.zst")
    t.write("seg-000001.zst", two)
    t.write("seg-000002.zst", one)


def _truncate(t: Tamper) -> None:
    t.write("seg-000002.zst", t.read("seg-000002.zst")[:-7])


def _edit_manifest_keep_signature(t: Tamper) -> None:
    body = json.loads(t.read("manifest.json"))
    body["end"]["exit"] = {"status": 0}
    body["session"]["identity"]["subject"] = "mallory"
    t.write("manifest.json", json.dumps(body).encode())


OTHER_KEY = RecordingKey(Ed25519PrivateKey.generate())

TAMPERING = {
    "flipped byte": (_flip_byte, "seg-000001.zst: content differs from the manifest"),
    "deleted segment": (lambda t: t.delete("seg-000002.zst"), "seg-000002.zst: missing from the store"),
    "swapped segments": (_swap, "seg-000001.zst: content differs from the manifest"),
    "truncated segment": (_truncate, "seg-000002.zst: content differs from the manifest"),
    "edited manifest": (_edit_manifest_keep_signature,
                        "manifest.json: signature does not match its content (manifest altered)"),
    "manifest signed by another key": (
        lambda t: t.write("manifest.json", _resign(t.read("manifest.json"), OTHER_KEY)),
        f"manifest.json: signed by {OTHER_KEY.key_id}, not by the trusted recording key"),
    "replaced manifest re-signed": (
        lambda t: t.write("manifest.json", _resign(t.read("manifest.json"), OTHER_KEY, _drop_last_segment)),
        f"manifest.json: signed by {OTHER_KEY.key_id}, not by the trusted recording key"),
    "deleted manifest": (lambda t: t.delete("manifest.json"),
                         "no manifest: the session is still running, or was never sealed"),
}


@pytest.mark.parametrize("kind", ["s3-governance", "file-copy"])
@pytest.mark.parametrize("case", list(TAMPERING))
def test_tampering_is_detected(moto: MotoServer, pristine, kind: str, case: str, tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    set_aws_env(monkeypatch, moto.url, tmp_path)
    sid, key, objects = pristine
    store = _copy(kind, moto, tmp_path, objects)
    assert verify(store, sid, key, "GOVERNANCE").ok
    action, expected = TAMPERING[case]
    action(Tamper(store, sid, moto))
    result = verify(store, sid, key, "GOVERNANCE")
    assert not result.ok
    assert result.problems[0].startswith(expected), result.problems


def test_planted_segment_is_detected(moto: MotoServer, pristine, tmp_path: Path,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    set_aws_env(monkeypatch, moto.url, tmp_path)
    sid, key, objects = pristine
    store = _copy("s3-governance", moto, tmp_path, objects)
    count = sum(1 for k in objects if "/seg-" in k)
    planted = session_prefix(sid) + segment_name(count)
    store.put(planted, objects[session_prefix(sid) + segment_name(count - 1)])
    assert verify(store, sid, key).problems == [f"store holds segments the manifest does not list: {planted}"]


def test_unlocked_replacement_is_detected(moto: MotoServer, pristine, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """An object rewritten without Object Lock (same bytes, so every hash still matches)."""
    set_aws_env(monkeypatch, moto.url, tmp_path)
    sid, key, objects = pristine
    store = _copy("s3-governance", moto, tmp_path, objects)
    t = Tamper(store, sid, moto)
    t.write("seg-000001.zst", t.read("seg-000001.zst"), locked=False)
    assert verify(store, sid, key, "GOVERNANCE").problems == ["seg-000001.zst: has no Object Lock retention"]


def test_tampering_through_the_cli(moto: MotoServer, pristine, tmp_path: Path,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    set_aws_env(monkeypatch, moto.url, tmp_path)
    sid, key, objects = pristine
    store = _copy("s3-governance", moto, tmp_path, objects)
    _flip_byte(Tamper(store, sid, moto))
    pem = tmp_path / "recording.pub"
    pem.write_text(key.public_pem())
    proc = replay_cli("--recordings", store.url, "verify", sid, "--public-key", str(pem))
    assert proc.returncode == 1
    assert proc.stdout.startswith(f"{sid}: FAILED: seg-000001.zst: content differs from the manifest")
    # Without a trusted key, a manifest re-signed by another key is only as good as that key: said loudly.
    t = Tamper(store, sid, moto)
    t.write("seg-000001.zst", objects[session_prefix(sid) + "seg-000001.zst"])
    t.write("manifest.json", _resign(t.read("manifest.json"), OTHER_KEY))
    proc = replay_cli("--recordings", store.url, "verify", sid)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.startswith(f"{sid}: UNVERIFIED"), proc.stdout
    proc = replay_cli("--recordings", store.url, "verify", sid, "--no-trusted-key")
    assert proc.returncode == 0 and proc.stdout.startswith(f"{sid}: OK"), proc.stdout + proc.stderr
    assert "warning: no trusted public key" in proc.stderr
    # Across a key rotation the auditor holds a keyring: a manifest signed by any key in it verifies,
    # one signed by a key outside it does not.
    keyring = tmp_path / "keyring"
    keyring.mkdir()
    (keyring / "2025.pem").write_text(key.public_pem())
    (keyring / "2026.pub").write_text(base64.b64encode(OTHER_KEY.public_raw).decode())
    proc = replay_cli("--recordings", store.url, "verify", sid, "--public-key", str(keyring))
    assert proc.returncode == 0 and proc.stdout.startswith(f"{sid}: OK"), proc.stdout + proc.stderr
    proc = replay_cli("--recordings", store.url, "verify", sid, "--public-key", str(pem),
                      "--public-key", base64.b64encode(RecordingKey(Ed25519PrivateKey.generate()).public_raw).decode())
    assert proc.returncode == 1 and "not by any of the 2 trusted keys" in proc.stdout, proc.stdout
    proc = replay_cli("--recordings", store.url, "verify", sid, "--public-key", str(tmp_path / "moto"))
    assert proc.returncode == 2 and "--public-key" in proc.stderr and "Traceback" not in proc.stderr


# -- an S3 outage in the middle of a session ----------------------------------------------------------


def test_s3_outage_mid_session_loses_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="guarita.recorder")
    moto = MotoServer(tmp_path / "moto", record=True).start()
    try:
        set_aws_env(monkeypatch, moto.url, tmp_path)
        bucket = moto.make_bucket()
        store = S3Store.from_url(f"s3://{bucket}/rec", retention=RETENTION, connect_timeout=1, read_timeout=5,
                                 max_attempts=2)
        key = new_key(tmp_path / "recording_key.pem")
        sid, written, rec = asyncio.run(_outage_scenario(moto, store, key, tmp_path / "spool"))
        # Everything the session printed, before, during and after the outage, is in the store.
        assert output_of(store, sid) == written
        result = verify(store, sid, key, "COMPLIANCE")
        assert result.ok, result.problems
        assert result.segments >= 5
    finally:
        moto.stop()
    assert rec.upload_errors >= 2 and rec.store_down_since is None and rec.uploads_pending == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "guarita.recorder" and r.levelno >= logging.WARNING]
    down = [m for m in warnings if m.startswith("cannot upload recordings to")]
    back = [m for m in warnings if "answers again" in m]
    assert len(down) == 1 and len(back) == 1, warnings
    assert f"cannot reach {moto.url}: connection refused" in down[0]


async def _outage_scenario(moto: MotoServer, store: S3Store, key: RecordingKey, spool: Path):
    rec = Recorder(store, spool, key, segment_seconds=0.3, segment_bytes=1 << 20, flush_interval=0.1)
    await rec.start()
    session = rec.open_session(META)
    written: list[bytes] = []
    stop = asyncio.Event()

    async def produce() -> None:  # a command printing a line every 10 ms, through the outage
        i = 0
        while not stop.is_set():
            data = f"line {i:06d} {secrets.token_hex(8)}\n".encode()
            session.output(data)
            written.append(data)
            i += 1
            await asyncio.sleep(0.01)

    producer = asyncio.create_task(produce())
    prefix = session_prefix(session.id)

    def uploaded() -> list[str]:
        return [k for k in store.list(prefix) if "/seg-" in k]

    async def segments_in_store(n: int) -> None:
        deadline = time.monotonic() + 20
        while len(await asyncio.to_thread(uploaded)) < n:
            assert time.monotonic() < deadline, "segments did not reach the store"
            await asyncio.sleep(0.05)

    await segments_in_store(2)
    await asyncio.to_thread(moto.stop)
    stopped_at = session.now()
    await await_until(lambda: rec.store_down_since is not None, 20, "the uploader to notice the outage")
    # An outage of several seconds, with segments piling up in the spool meanwhile.
    await await_until(lambda: session.now() - stopped_at >= 3.0 and rec.uploads_pending >= 4, 20,
                      "segments to pile up in the spool")
    assert rec.spool_bytes() > 0
    await asyncio.to_thread(moto.restart)  # same port; bucket and objects come back from moto's request log
    await await_until(lambda: rec.store_down_since is None, 30, "uploads to resume by themselves")
    count = len(written)
    await await_until(lambda: len(written) > count + 30, 20, "more events after the outage")
    stop.set()
    await producer
    session.exit(0)
    await session.close()
    assert await rec.wait_uploaded(30)
    await rec.close()
    assert rec.spool_bytes() == rec._walk_spool() == 0
    return session.id, b"".join(written), rec


# -- spool budget, one warning per outage, conflicts --------------------------------------------------


class FlakyStore(FileStore):
    """A local store that can be switched off, standing for an unreachable S3."""

    down = False

    def put(self, key: str, data: bytes) -> None:
        if self.down:
            raise StoreError("cannot reach http://127.0.0.1:9: connection refused")
        super().put(key, data)


def test_spool_budget_refuses_new_sessions_while_store_is_down(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="guarita.recorder")
    store = FlakyStore(tmp_path / "store")
    store.down = True
    key = new_key(tmp_path / "recording_key.pem")

    async def scenario() -> Recorder:
        rec = Recorder(store, tmp_path / "spool", key, segment_seconds=60, segment_bytes=4096,
                       flush_interval=0.05, spool_budget=20_000)
        await rec.start()
        assert not rec.spool_full()
        session = rec.open_session(META)
        i = 0
        while not rec.spool_full():
            session.output(f"{i:06d} {secrets.token_hex(32)}\n".encode())
            i += 1
            if i % 20 == 0:
                await session.drained()
                await asyncio.sleep(0.001)
            assert i < 100_000
        reason = rec.spool_full_reason()
        assert reason.startswith(f"the recording spool {tmp_path / 'spool'} holds ")
        assert "KiB, over its budget of 19.5 KiB, because the recordings store has been unreachable since " in reason
        assert reason.endswith("; new sessions are refused until the recordings are uploaded")
        assert "recordings store has been unreachable since" in reason
        await session.close()
        assert rec.spool_bytes() == rec._walk_spool()  # the tracked size matches the disk
        await await_until(lambda: rec.upload_errors >= 4, 20, "several failed retries")
        assert rec.spool_full()
        store.down = False
        assert await rec.wait_uploaded(30)
        assert not rec.spool_full() and rec.spool_bytes() == rec._walk_spool() == 0
        await rec.close()
        return rec

    rec = asyncio.run(scenario())
    assert rec.store_down_since is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert sum(m.startswith("cannot upload recordings to") for m in warnings) == 1, warnings
    assert sum("answers again" in m for m in warnings) == 1, warnings


def test_conflicting_object_does_not_block_the_uploads(tmp_path: Path) -> None:
    store = FileStore(tmp_path / "store")
    key = new_key(tmp_path / "recording_key.pem")
    sid = "20261125-081106-ab12cd34"
    store.put(session_prefix(sid) + "seg-000001.zst", b"somebody else's object")

    async def scenario() -> Recorder:
        rec = Recorder(store, tmp_path / "spool", key, segment_seconds=60, segment_bytes=2048, flush_interval=0.05)
        await rec.start()
        session = rec.open_session(META, session_id=sid)
        for i in range(100):
            session.output(f"{i:05d} {secrets.token_hex(20)}\n".encode())
        await session.close()
        assert await rec.wait_uploaded(10), "a conflicting object held up the uploads"
        await rec.close()
        return rec

    rec = asyncio.run(scenario())
    assert rec.upload_conflicts == 1
    assert (tmp_path / "spool" / CONFLICTS_DIR / sid / "seg-000001.zst").exists()
    assert verify(store, sid, key).problems[0].startswith("seg-000001.zst: content differs from the manifest")

    async def restart() -> list[str]:  # the set-aside copy is not mistaken for a crashed session
        again = Recorder(store, tmp_path / "spool", key)
        recovered = await again.start()
        await again.close()
        return recovered

    assert asyncio.run(restart()) == []


# -- SIGKILL during a session -------------------------------------------------------------------------

CHILD = r"""
import asyncio, os, sys
from pathlib import Path
from recorder import Recorder, RecordingKey, open_store

async def main():
    spool, key_file, url, side = sys.argv[1:5]
    store = open_store(url, "COMPLIANCE", 3600)
    rec = Recorder(store, Path(spool), RecordingKey.load_or_create(Path(key_file)),
                   segment_seconds=0.5, flush_interval=0.2)
    await rec.start()
    session = rec.open_session({"identity": {"subject": "alice"}, "target": "demo", "kind": "exec",
                                "command": "tail -f /var/log/app.log"})
    fd = os.open(side, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(fd, f"session {session.id}\n".encode())
    i = 0
    while True:
        session.output(f"line {i:06d}\n".encode())
        # What the recorder was handed, and when (its own clock): fsynced, so it survives the kill.
        os.write(fd, f"{i} {session.now():.6f}\n".encode())
        os.fsync(fd)
        i += 1
        await asyncio.sleep(0.01)

asyncio.run(main())
"""

FLUSH_INTERVAL = 0.2
TAIL_MARGIN = 0.15


def _side_file(path: Path) -> tuple[str | None, dict[int, float]]:
    sid, times = None, {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2:
            continue  # a line cut by the kill
        if parts[0] == "session":
            sid = parts[1]
        else:
            times[int(parts[0])] = float(parts[1])
    return sid, times


def test_sigkill_mid_session_is_recovered(s3env: MotoServer, tmp_path: Path) -> None:
    bucket = s3env.make_bucket()
    url = f"s3://{bucket}/rec"
    spool, key_file, side = tmp_path / "spool", tmp_path / "recording_key.pem", tmp_path / "events.txt"
    key = new_key(key_file)
    store = S3Store.from_url(url, retention=RETENTION)
    # The child flushes every 0.2 s from its start: kill it at a random phase of that cycle
    # (a fixed threshold would always land just after a flush, the best case).
    kill_after = 1.8 + random.uniform(0, FLUSH_INTERVAL)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(spool), str(key_file), url, str(side)],
                             cwd=REPO, env=os.environ.copy(), stdin=subprocess.DEVNULL,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        def running_long_enough() -> bool:
            assert child.poll() is None, child.communicate()[0].decode(errors="replace")
            if not side.exists():
                return False
            sid, times = _side_file(side)
            # Some segments sealed and uploaded, and the session well into its current segment.
            return bool(sid and times and max(times.values()) > kill_after
                        and any("/seg-" in k for k in store.list(session_prefix(sid))))

        wait_for(running_long_enough, 30, "the child to record for a while")
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
        child.stdout.close()
    sid, times = _side_file(side)
    assert sid is not None
    last_handed = max(times)

    async def recover() -> list[str]:
        rec = Recorder(store, spool, key, segment_seconds=0.5, flush_interval=FLUSH_INTERVAL)
        recovered = await rec.start()
        assert await rec.wait_uploaded(30)
        await rec.close()
        return recovered

    assert asyncio.run(recover()) == [sid]
    assert not (spool / sid).exists()

    summary = open_session(store, sid)
    assert summary.state == "recovered" and summary.end["recovered"] is True
    result = verify_session(store, summary, key.public_raw, "COMPLIANCE")
    assert result.ok, result.problems
    assert result.segments >= 3

    events = list(iter_events(store, summary))
    lines = [e.stream_bytes() for e in events if e.stream == "o"]
    got = [int(line.split()[1]) for line in b"".join(lines).splitlines()]
    # Nothing is missing before the tail: events 0..k, in order, each exactly once.
    assert got == list(range(len(got)))
    markers = [e.data for e in events if e.code == "m"]
    assert markers[-1]["type"] == "recovered-end"
    assert events[-1].code == "x"
    last_kept = got[-1]
    missing_tail = times[last_handed] - times[last_kept]
    print(f"recovered {last_kept + 1} of {last_handed + 1} events; missing tail {missing_tail * 1000:.0f} ms")
    assert missing_tail <= FLUSH_INTERVAL + TAIL_MARGIN, (
        f"lost {missing_tail:.3f}s of events (events {last_kept + 1}..{last_handed}), flush interval "
        f"{FLUSH_INTERVAL}s")
