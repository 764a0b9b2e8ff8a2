"""The recorder: every event of every session reaches a fsynced local spool, then the store.

Path of an event: a front door calls ``SessionRecording.output()`` (synchronous, cheap:
it encodes a JSON line into a buffer). At least once per ``flush_interval`` the buffer
becomes one zstd frame appended and fsynced to the session's open segment file in the
spool. Every ``segment_seconds`` or ``segment_bytes`` the segment is sealed (renamed,
its hash appended to ``chain.jsonl``) and queued for upload; the next segment's header
carries the sealed one's hash. When the session ends, a signed manifest follows.

Spool layout, per session directory ``<spool>/<session-id>/``:
  meta.json               session metadata (local copy, kept until the session is uploaded)
  start.json              the same, waiting for upload (deleted once uploaded)
  seg-000003.zst.open     the segment being written
  seg-000002.zst          sealed, waiting for upload (deleted once uploaded)
  chain.jsonl             one SegmentRecord per sealed segment, fsynced
  manifest.json           signed manifest, waiting for upload; the directory goes with it

File work runs in worker threads, one ordered queue per session, so the event loop
that relays terminal traffic never waits on a disk.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recorder import events as ev
from recorder.segment import (
    SegmentRecord,
    SegmentWriter,
    make_header,
    parse_segment,
    read_frames,
    segment_name,
)
from recorder.signing import RecordingKey
from recorder.snapshot import ScreenTracker
from recorder.store import ObjectExists, RecordingStore, StoreError, session_prefix

log = logging.getLogger("guarita.recorder")

MANIFEST_FORMAT = "guarita-manifest/1"
SESSION_FORMAT = "guarita-session/1"
# Above this many bytes waiting for the disk, the front door stops reading from the
# upstream until the spool catches up: memory stays bounded and nothing is dropped.
HIGH_WATER = 16 * 1024 * 1024
LOW_WATER = 4 * 1024 * 1024
FRAME_BYTES = 256 * 1024


class RecordingFailed(Exception):
    """The spool cannot take this session's events (strict policy ends the session)."""


def new_session_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(4)}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Recorder:
    """One per gateway: owns the spool, the uploader and the signing key."""

    def __init__(self, store: RecordingStore, spool_dir: Path, key: RecordingKey, *,
                 segment_seconds: float = 5.0, segment_bytes: int = 512 * 1024,
                 flush_interval: float = 1.0, failure_policy: str = "strict") -> None:
        self.store = store
        self.spool_dir = spool_dir
        self.key = key
        self.segment_seconds = segment_seconds
        self.segment_bytes = segment_bytes
        self.flush_interval = flush_interval
        self.failure_policy = failure_policy
        self.sessions: dict[str, SessionRecording] = {}
        self.upload_errors = 0
        self.uploads_pending = 0
        self._uploads: asyncio.Queue[tuple[Path, str]] = asyncio.Queue()
        self._uploader: asyncio.Task[None] | None = None

    async def start(self) -> list[str]:
        """Create the spool, seal what a previous process left behind, start uploading.
        Returns the ids of recovered sessions."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        recovered = await asyncio.to_thread(self._recover_all)
        self._uploader = asyncio.create_task(self._upload_loop(), name="recording-uploader")
        return recovered

    def open_session(self, meta: dict[str, Any], term: tuple[int, int] | None = None,
                     session_id: str | None = None) -> SessionRecording:
        rec = SessionRecording(self, session_id or new_session_id(), meta, term)
        self.sessions[rec.id] = rec
        return rec

    async def close(self, timeout: float = 10.0) -> None:
        """Seal live sessions, then give the uploader ``timeout`` seconds to drain the spool."""
        for rec in list(self.sessions.values()):
            await rec.close({"reason": "gateway shutting down"})
        deadline = time.monotonic() + timeout
        while self.uploads_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self._uploader:
            self._uploader.cancel()
            await asyncio.gather(self._uploader, return_exceptions=True)
        if self.uploads_pending:
            log.warning("%d recording objects still in the spool %s; they are uploaded at the next start",
                        self.uploads_pending, self.spool_dir)

    async def wait_uploaded(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.uploads_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.uploads_pending

    def spool_bytes(self) -> int:
        total = 0
        for dirpath, _, files in os.walk(self.spool_dir):
            for name in files:
                try:
                    total += os.stat(os.path.join(dirpath, name)).st_size
                except OSError:
                    pass
        return total

    # -- upload ------------------------------------------------------------------

    def queue_upload(self, path: Path, key: str) -> None:
        self.uploads_pending += 1
        self._uploads.put_nowait((path, key))

    async def _upload_loop(self) -> None:
        while True:
            path, key = await self._uploads.get()
            delay = 0.2
            while True:
                try:
                    await asyncio.to_thread(self._upload_one, path, key)
                    break
                except (StoreError, OSError) as exc:
                    self.upload_errors += 1
                    log.warning("upload of %s to %s failed (%s); retrying in %.1fs", key, self.store.url, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
            self.uploads_pending -= 1

    def _upload_one(self, path: Path, key: str) -> None:
        data = path.read_bytes()
        try:
            self.store.put(key, data)
        except ObjectExists:
            # A previous process uploaded it and died before deleting the spool copy.
            if self.store.get(key) != data:
                raise StoreError(f"{key} already exists with different content; keeping {path}") from None
        if path.name == "manifest.json":
            shutil.rmtree(path.parent, ignore_errors=True)
        else:
            path.unlink()

    # -- recovery after a crash ----------------------------------------------------

    def _recover_all(self) -> list[str]:
        recovered = []
        for session_dir in sorted(p for p in self.spool_dir.iterdir() if p.is_dir()):
            try:
                if self._recover_one(session_dir):
                    recovered.append(session_dir.name)
            except Exception as exc:  # one damaged directory must not stop the gateway
                log.error("cannot recover spooled session %s: %s (left in place)", session_dir, exc)
        return recovered

    def _recover_one(self, session_dir: Path) -> bool:
        sid = session_dir.name
        prefix = session_prefix(sid)
        was_open = not (session_dir / "manifest.json").exists()
        if was_open:
            meta = json.loads((session_dir / "meta.json").read_text())
            chain = _read_chain(session_dir)
            record = _seal_recovered(session_dir, sid, chain)
            chain.append(record)
            _append_chain(session_dir, record)
            end = {"reason": "gateway stopped unexpectedly; recording sealed from the spool at the next start",
                   "recovered": True, "ended_at": iso(time.time())}
            _write_manifest(session_dir, self.key, meta, end, chain)
            log.warning("recovered session %s from the spool (%d segments)", sid, len(chain))
        for name in ("start.json", *sorted(p.name for p in session_dir.glob("seg-*.zst")), "manifest.json"):
            if (session_dir / name).exists():
                self.queue_upload(session_dir / name, prefix + name)
        return was_open


class SessionRecording:
    """The recording of one session. Methods are synchronous and never block on I/O."""

    def __init__(self, recorder: Recorder, session_id: str, meta: dict[str, Any],
                 term: tuple[int, int] | None) -> None:
        self.recorder = recorder
        self.id = session_id
        self.prefix = session_prefix(session_id)
        self.dir = recorder.spool_dir / session_id
        self.started = time.time()
        self._t0 = time.monotonic()
        self.meta = {"format": SESSION_FORMAT, "id": session_id, "started_at": iso(self.started), **meta}
        if term:
            self.meta.setdefault("term", {})
            self.meta["term"].update({"cols": term[0], "rows": term[1]})
        self.on_failure: Callable[[Exception], None] | None = None
        self.failed: Exception | None = None
        self.closed = False
        self.counts: dict[str, int] = {"o": 0, "e": 0, "i": 0}
        self.markers: dict[str, int] = {}
        self._encoders = {c: ev.StreamEncoder(c) for c in ("o", "e", "i")}
        self._screen = ScreenTracker(*term) if term else None
        self._buf: list[bytes] = []
        self._buf_len = 0
        self._buf_events = 0
        self._seg_raw = 0
        self._seg_t = 0.0
        self._last_t = 0.0
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._chain: list[SegmentRecord] = []
        self._writer: SegmentWriter | None = None
        self._ops: asyncio.Queue[Callable[[], Any] | None] = asyncio.Queue()
        self._op_task = asyncio.create_task(self._run_ops(), name=f"recording-{session_id}")
        self._timer = asyncio.create_task(self._tick(), name=f"recording-timer-{session_id}")
        snapshot = self._screen.snapshot() if self._screen else None
        self._submit(lambda: self._op_open(snapshot), 0)

    # -- events ----------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self._t0

    def output(self, data: bytes, stream: str = "o") -> None:
        """Bytes the target sent (``o`` stdout, ``e`` stderr)."""
        if not data:
            return
        self.counts[stream] += len(data)
        t = self.now()
        line = self._encoders[stream].encode(t, data)
        if self._screen is not None and stream == "o":
            self._screen.feed(data.decode("utf-8", "replace"))
        self._append(line, t)

    def input(self, data: bytes) -> None:
        if data:
            self.counts["i"] += len(data)
            t = self.now()
            self._append(self._encoders["i"].encode(t, data), t)

    def input_at(self, t: float, data: bytes) -> None:
        """Input typed at ``t`` but recorded later (the echo detector holds keystrokes briefly)."""
        if data:
            self.counts["i"] += len(data)
            t = max(t, self._last_t)
            self._append(self._encoders["i"].encode(t, data), t)

    def resize(self, cols: int, rows: int) -> None:
        if self._screen is not None:
            self._screen.resize(cols, rows)
        t = self.now()
        self._append(ev.encode(t, "r", f"{cols}x{rows}"), t)

    def marker(self, kind: str, **fields: Any) -> None:
        self.markers[kind] = self.markers.get(kind, 0) + 1
        t = self.now()
        self._append(ev.encode(t, "m", {"type": kind, **fields}), t)

    def exit(self, status: int | None, signal: str | None = None, reason: str | None = None) -> None:
        t = self.now()
        for enc in self._encoders.values():
            tail = enc.flush(t)
            if tail:
                self._append(tail, t)
        self._append(ev.encode(t, "x", {"status": status, "signal": signal, "reason": reason}), t)

    async def sync(self) -> None:
        """Wait until every event so far is fsynced in the spool and sealed segments are queued."""
        self._flush(sync=True)
        done = asyncio.get_running_loop().create_future()
        self._submit(lambda: self._loop.call_soon_threadsafe(done.set_result, None), 0)
        if self.failed is None:
            await asyncio.wait([done, self._op_task], return_when=asyncio.FIRST_COMPLETED)

    @property
    def congested(self) -> bool:
        return self._inflight > HIGH_WATER

    async def drained(self) -> None:
        await self._drained.wait()

    async def close(self, end: dict[str, Any] | None = None) -> None:
        """Seal the last segment and write the signed manifest. Idempotent."""
        if self.closed:
            return
        self.closed = True
        self._timer.cancel()
        end = {"ended_at": iso(time.time()), "duration": round(self.now(), 3),
               "bytes": dict(self.counts), "markers": dict(self.markers), **(end or {})}
        self._cut(final=True, end=end)
        self._ops.put_nowait(None)
        await asyncio.gather(self._op_task, return_exceptions=True)
        self.recorder.sessions.pop(self.id, None)

    # -- buffering and segment cutting --------------------------------------------------

    def _append(self, line: bytes, t: float) -> None:
        if self.closed or (self.failed and self.recorder.failure_policy == "strict"):
            return
        self._last_t = max(self._last_t, t)
        self._buf.append(line)
        self._buf_len += len(line)
        self._buf_events += 1
        self._seg_raw += len(line)
        if self._seg_raw >= self.recorder.segment_bytes:
            self._cut()
        elif self._buf_len >= FRAME_BYTES:
            self._flush(sync=False)

    def _take(self) -> tuple[bytes, int]:
        raw, n = b"".join(self._buf), self._buf_events
        self._buf, self._buf_len, self._buf_events = [], 0, 0
        return raw, n

    def _flush(self, sync: bool) -> None:
        raw, n = self._take()
        t_end = self._last_t
        self._submit(lambda: self._writer_append(raw, n, t_end, sync), len(raw))

    def _cut(self, final: bool = False, end: dict[str, Any] | None = None) -> None:
        raw, n = self._take()
        t_end = self._last_t
        next_t = self._last_t
        snapshot = None if final or self._screen is None else self._screen.snapshot()
        self._seg_raw = 0
        self._seg_t = next_t
        self._submit(lambda: self._op_seal(raw, n, t_end, final, snapshot, next_t, end), len(raw))

    async def _tick(self) -> None:
        interval = self.recorder.flush_interval
        while True:
            await asyncio.sleep(interval)
            if self._seg_raw and self.now() - self._seg_t >= self.recorder.segment_seconds:
                self._cut()
            else:
                self._flush(sync=True)

    # -- the ordered file-work queue (runs in threads) -----------------------------------

    def _submit(self, op: Callable[[], Any], size: int) -> None:
        self._inflight += size
        if self._inflight > HIGH_WATER:
            self._drained.clear()

        def run() -> None:
            try:
                op()
            finally:
                self._inflight -= size

        self._ops.put_nowait(run)

    async def _run_ops(self) -> None:
        while True:
            op = await self._ops.get()
            if op is None:
                return
            if self.failed and self.recorder.failure_policy == "strict":
                continue
            try:
                await asyncio.to_thread(op)
            except (OSError, StoreError, ValueError) as exc:
                self._fail(exc)
            if self._inflight <= LOW_WATER:
                self._drained.set()

    def _fail(self, exc: Exception) -> None:
        first = self.failed is None
        self.failed = exc
        if first:
            log.error("recording of session %s cannot reach the spool %s: %s (policy %s)",
                      self.id, self.dir, exc, self.recorder.failure_policy)
            self._drained.set()
            if self.on_failure:
                self.on_failure(exc)

    def _op_open(self, snapshot: dict[str, Any] | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.meta, ensure_ascii=False, indent=1).encode()
        for name in ("meta.json", "start.json"):
            _write_file(self.dir / name, meta)
        self.recorder_loop_call(lambda: self.recorder.queue_upload(self.dir / "start.json", self.prefix + "start.json"))
        self._writer = self._new_writer(0, None, 0.0, snapshot)

    def _new_writer(self, index: int, prev: str | None, t: float, snapshot: dict[str, Any] | None) -> SegmentWriter:
        path = self.dir / (segment_name(index) + ".open")
        return SegmentWriter(path, index, make_header(self.id, index, prev, t, snapshot), t)

    def _writer_append(self, raw: bytes, n: int, t_end: float, sync: bool) -> None:
        assert self._writer is not None
        self._writer.append(raw, n, t_end, sync)

    def _op_seal(self, raw: bytes, n: int, t_end: float, final: bool, snapshot: dict[str, Any] | None,
                 next_t: float, end: dict[str, Any] | None) -> None:
        writer = self._writer
        assert writer is not None
        writer.append(raw, n, t_end, sync=False)
        name = segment_name(writer.index)
        record = writer.seal(self.dir / name)
        self._chain.append(record)
        _append_chain(self.dir, record)
        self.recorder_loop_call(lambda: self.recorder.queue_upload(self.dir / name, self.prefix + name))
        if final:
            self._writer = None
            _write_manifest(self.dir, self.recorder.key, self.meta, end or {}, self._chain)
            self.recorder_loop_call(
                lambda: self.recorder.queue_upload(self.dir / "manifest.json", self.prefix + "manifest.json"))
        else:
            self._writer = self._new_writer(writer.index + 1, record.sha256, next_t, snapshot)

    def recorder_loop_call(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(fn)

    @property
    def _loop(self) -> asyncio.AbstractEventLoop:
        return self._op_task.get_loop()


# -- helpers shared by live sessions and recovery ----------------------------------------


def _write_file(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def _append_chain(session_dir: Path, record: SegmentRecord) -> None:
    with open(session_dir / "chain.jsonl", "a") as f:
        f.write(json.dumps(record.to_dict()) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _read_chain(session_dir: Path) -> list[SegmentRecord]:
    records: dict[int, SegmentRecord] = {}
    path = session_dir / "chain.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rec = SegmentRecord.from_dict(json.loads(line))
            except (ValueError, KeyError):
                continue  # a line cut by the crash
            records[rec.index] = rec
    # A segment sealed (renamed) just before the crash but not yet in the chain file.
    for sealed in session_dir.glob("seg-*.zst"):
        index = int(sealed.name[4:10])
        if index not in records:
            records[index] = _record_from_file(sealed, index)
    return [records[i] for i in sorted(records)]


def _record_from_file(path: Path, index: int) -> SegmentRecord:
    import hashlib

    data = path.read_bytes()
    header, events = parse_segment(data, path.name)
    t_end = max([float(header["t"])] + [e.t for e in events])
    raw, _, _ = read_frames(data)
    return SegmentRecord(index, hashlib.sha256(data).hexdigest(), len(data), len(raw),
                         float(header["t"]), t_end, len(events))


def _seal_recovered(session_dir: Path, sid: str, chain: list[SegmentRecord]) -> SegmentRecord:
    """Seal the open segment as far as it was fsynced, ending it with a recovered-end marker."""
    index = chain[-1].index + 1 if chain else 0
    prev = chain[-1].sha256 if chain else None
    open_path = session_dir / (segment_name(index) + ".open")
    t_last = chain[-1].t_end if chain else 0.0
    kept = b""
    if open_path.exists():
        data = open_path.read_bytes()
        raw, good, _ = read_frames(data)
        header_line, _, rest = raw.partition(b"\n")
        if header_line:
            kept = data[:good]
            for e in ev.decode_lines(rest):
                t_last = max(t_last, e.t)
    writer_path = session_dir / (segment_name(index) + ".recovering")
    if kept:
        writer_path.write_bytes(kept)
        writer = SegmentWriter.__new__(SegmentWriter)
        _resume_writer(writer, writer_path, index, kept, t_last)
    else:
        writer = SegmentWriter(writer_path, index, make_header(sid, index, prev, t_last, None), t_last)
    marker = ev.encode(t_last, "m", {"type": "recovered-end", "reason": "gateway stopped unexpectedly"})
    exit_line = ev.encode(t_last, "x", {"status": None, "signal": None, "reason": "recording recovered after a gateway crash"})
    writer.append(marker + exit_line, 2, t_last, sync=True)
    record = writer.seal(session_dir / segment_name(index))
    open_path.unlink(missing_ok=True)
    return record


def _resume_writer(writer: SegmentWriter, path: Path, index: int, kept: bytes, t_last: float) -> None:
    """Reopen a partly written segment for appending, rebuilding its running hash and sizes."""
    import hashlib

    import zstandard

    raw, _, _ = read_frames(kept)
    header = json.loads(raw.partition(b"\n")[0])
    writer.path = path
    writer.index = index
    writer.t_start = float(header["t"])
    writer.t_end = t_last
    writer.raw_size = len(raw)
    writer.size = len(kept)
    writer.events = sum(1 for line in raw.split(b"\n")[1:] if line)
    writer._hash = hashlib.sha256(kept)
    writer._cctx = zstandard.ZstdCompressor(level=3)
    writer._fd = os.open(path, os.O_WRONLY | os.O_APPEND)


def _write_manifest(session_dir: Path, key: RecordingKey, meta: dict[str, Any], end: dict[str, Any],
                    chain: list[SegmentRecord]) -> None:
    import base64

    body = {
        "format": MANIFEST_FORMAT,
        "session": meta,
        "end": end,
        "segments": [r.to_dict() for r in chain],
        "key_id": key.key_id,
        "public_key": base64.b64encode(key.public_raw).decode(),
        "signed_at": iso(time.time()),
    }
    manifest = {**body, "signature": key.sign(body)}
    _write_file(session_dir / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode())
