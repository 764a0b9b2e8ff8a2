"""Parallel upload: several objects in flight at once, and still every segment stored once,
every manifest after its session's segments, listing them once and in order, through a
store that is slow and fails at random. Unit level: a FileStore wrapped in faults."""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import threading
import time
from pathlib import Path

from recorder import Recorder, RecordingKey
from recorder.segment import segment_name
from recorder.store import FileStore, StoreError, session_prefix
from replay.reader import open_session
from replay.verify import verify_session

META = {"identity": {"subject": "alice"}, "target": "demo", "login": "demo", "kind": "shell", "tty": True,
        "command": None}


class FlakyStore(FileStore):
    """A FileStore whose puts are slow and fail one time in four; records what happened."""

    def __init__(self, root: Path, fail_rate: float = 0.25) -> None:
        super().__init__(root)
        self.fail_rate = fail_rate
        self.rng = random.Random(7)
        self.lock = threading.Lock()
        self.puts: list[str] = []  # successful puts, in completion order
        self.in_flight = 0
        self.most_in_flight = 0
        self.down = False

    def put(self, key: str, data: bytes) -> None:
        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
            fail = self.down or self.rng.random() < self.fail_rate
            pause = self.rng.uniform(0.001, 0.02)
        try:
            time.sleep(pause)
            if fail:
                raise StoreError("store unavailable (injected)")
            super().put(key, data)
            with self.lock:
                self.puts.append(key)
        finally:
            with self.lock:
                self.in_flight -= 1


async def _record(rec: Recorder, n_sessions: int, lines: int) -> list[str]:
    sessions = [rec.open_session(META, term=(80, 24)) for _ in range(n_sessions)]
    for i in range(lines):
        for s in sessions:
            s.output(f"{i:05d} {secrets.token_hex(24)}\r\n".encode())
        if i % 20 == 0:
            await asyncio.sleep(0.001)
    for s in sessions:
        s.exit(0)
    await asyncio.gather(*(s.close() for s in sessions))
    return [s.id for s in sessions]


def test_parallel_upload_keeps_each_segment_once_and_manifests_last(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "store")
    key = RecordingKey.load_or_create(tmp_path / "key.pem")

    async def scenario() -> list[str]:
        rec = Recorder(store, tmp_path / "spool", key, segment_seconds=60, segment_bytes=4096,
                       flush_interval=0.05, upload_concurrency=6)
        await rec.start()
        ids = await _record(rec, n_sessions=6, lines=300)
        assert await rec.wait_uploaded(60), "uploads did not drain"
        assert rec.oldest_pending_upload() is None
        await rec.close()
        return ids

    ids = asyncio.run(scenario())
    assert store.most_in_flight > 1, "uploads never overlapped"
    assert len(store.puts) == len(set(store.puts)), "an object was stored twice"
    for sid in ids:
        prefix = session_prefix(sid)
        manifest = json.loads(store.get(prefix + "manifest.json"))
        indexes = [s["index"] for s in manifest["segments"]]
        assert indexes == list(range(len(indexes))) and len(indexes) > 3
        stored = sorted(k for k in store.list(prefix) if k.rsplit("/", 1)[1].startswith("seg-"))
        assert stored == [prefix + segment_name(i) for i in indexes]
        manifest_at = store.puts.index(prefix + "manifest.json")
        assert all(store.puts.index(k) < manifest_at for k in stored), "manifest stored before a segment"
        result = verify_session(store, open_session(store, sid), key.public_raw)
        assert result.ok, result.problems
    assert not (tmp_path / "spool").exists() or not any(p for p in (tmp_path / "spool").iterdir()
                                                         if not p.name.startswith("."))


def test_upload_lag_is_the_oldest_waiting_object(tmp_path: Path) -> None:
    store = FlakyStore(tmp_path / "store", fail_rate=0.0)
    key = RecordingKey.load_or_create(tmp_path / "key.pem")

    async def scenario() -> None:
        rec = Recorder(store, tmp_path / "spool", key, segment_seconds=60, segment_bytes=2048,
                       flush_interval=0.05, upload_concurrency=4)
        await rec.start()
        store.down = True
        before = time.time()
        session = rec.open_session(META)
        for i in range(100):
            session.output(f"{i:05d} {secrets.token_hex(20)}\n".encode())
        await session.sync()
        deadline = time.monotonic() + 20
        while rec.uploads_pending < 3:
            assert time.monotonic() < deadline, "segments were not queued"
            await asyncio.sleep(0.02)
        oldest = rec.oldest_pending_upload()
        assert oldest is not None and before <= oldest <= time.time()
        # Later objects do not move the lag: it stays the first one's queue time.
        session.output(b"more\n" * 2000)
        await session.sync()
        assert rec.oldest_pending_upload() == oldest
        store.down = False
        await session.close()
        assert await rec.wait_uploaded(60)
        assert rec.oldest_pending_upload() is None and rec.uploads_pending == 0
        await rec.close()

    asyncio.run(scenario())


def test_an_idle_session_costs_no_fsync(tmp_path: Path, monkeypatch) -> None:
    """1,000 idle sessions were 1,000 fsyncs a second: a tick with nothing new does nothing,
    and the next output is fsynced within a flush interval again."""
    import os

    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd))[1])
    store = FileStore(tmp_path / "store")
    key = RecordingKey.load_or_create(tmp_path / "key.pem")

    async def scenario() -> None:
        rec = Recorder(store, tmp_path / "spool", key, segment_seconds=60, flush_interval=0.02)
        await rec.start()
        session = rec.open_session(META, term=(80, 24))
        session.output(b"hello\r\n")
        await session.sync()
        assert await rec.wait_uploaded(30)  # start.json's upload (the file store fsyncs) is over
        before = len(calls)
        await asyncio.sleep(0.4)  # twenty flush intervals with nothing to write
        assert len(calls) == before, "an idle session's ticks fsynced"
        session.output(b"again\r\n")
        deadline = time.monotonic() + 10
        while len(calls) == before:  # the next tick syncs the new frame by itself
            assert time.monotonic() < deadline, "new output was not fsynced by the tick"
            await asyncio.sleep(0.01)
        session.exit(0)
        await session.close()
        assert await rec.wait_uploaded(30)
        await rec.close()

    asyncio.run(scenario())
