"""The recorder: every event of every session reaches a fsynced local spool, then the store.

Path of an event: a front door calls ``SessionRecording.output()`` (synchronous, cheap:
it encodes a JSON line into a buffer). At least once per ``flush_interval`` the buffer
becomes one zstd frame appended and fsynced to the session's open segment file in the
spool. Every ``segment_seconds``, or once its encoded events reach ``segment_bytes``
(uncompressed: what a reader holds in memory), the segment is sealed (renamed,
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
import collections
import concurrent.futures
import dataclasses
import json
import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from recorder import events as ev
from recorder import summary as search_summary
from recorder.index import SessionIndexNotes
from recorder.segment import (
    COMPRESSION_LEVEL,
    SegmentRecord,
    SegmentWriter,
    make_header,
    parse_segment,
    read_frames,
    segment_name,
)
from recorder.signing import RecordingKey
from recorder.snapshot import ScreenTracker, snapshot_due
from recorder.store import RecordingStore, StoreError, session_prefix
from recorder.units import human_size
from recorder.uploads import StoreConflict, ThreadUploader, Uploader

log = logging.getLogger("guarita.recorder")

MANIFEST_FORMAT = "guarita-manifest/1"
SESSION_FORMAT = "guarita-session/1"
# Above this many bytes waiting for the disk, the front door stops reading from the
# upstream until the spool catches up: memory stays bounded and nothing is dropped.
HIGH_WATER = 16 * 1024 * 1024
LOW_WATER = 4 * 1024 * 1024
# Buffered events go to the worker in batches this large (or every flush_interval): fewer,
# larger hand-offs between the event loop and the worker thread cost less CPU per byte. Not
# larger: at 4 MiB the worker's passes over a batch fall out of the CPU's caches and text
# cost 7-8 CPU s/GB instead of 5.5-6 (bench/recorder_cpu, issue 21).
FRAME_BYTES = 1024 * 1024
# Output that encodes to little (zeros, other binary: stored zstd-compressed) is batched by its
# estimated encoded size, up to this many terminal bytes: a quarter of the hand-offs (thread
# wake-ups, each a chance for the worker to take the GIL from the relaying loop) on bulk binary
# output, for at most 3 MiB more memory per session.
FRAME_BYTES_MAX = 4 * 1024 * 1024
# The least a terminal byte counts towards segment_bytes, however well it encodes: a
# segment of zeros is cut after 64 x segment_bytes of them (or segment_seconds).
MIN_RATIO = 1 / 64
# Reads of one stream closer together than this are recorded as one event.
MERGE_SECONDS = 0.005
# Upload retries back off from 0.2 s up to this: when the store comes back, uploads resume
# within this many seconds without anyone doing anything.
RETRY_MAX_DELAY = 15.0
# Objects uploaded at once: PUTs are mostly waiting on the network and the store, so a
# few in flight keep the upload lag at seconds where one at a time fell minutes behind.
UPLOAD_CONCURRENCY = 8
# The flusher wakes this many times per flush interval (each session's turn comes round once
# per interval; spreading them keeps one wake-up short), and hands the due sessions' file
# work to the thread pool in jobs of about this many sessions.
FLUSH_PHASES = 4
BATCH_SESSIONS = 64
# Worker threads for the sessions' file work. Their Python (encoding, seals) holds the GIL
# that the event loop needs for every keystroke it relays: at 1,000 typing sessions, six
# threads (the old cpu_count + 4) left the loop waiting behind each in turn, echo p99 583 ms,
# against 186 ms with two and 124 ms with one (docs/benchmarks.md). Compression, writes and
# fsyncs release the GIL, so one thread keeps up on 2 cores; with 4 or more, a second one
# compresses beside it.
RECORDER_THREADS = 1 if (os.cpu_count() or 1) < 4 else 2
# Spooled objects the store refused because a different object already has their key.
CONFLICTS_DIR = ".conflicts"


def new_session_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(now or time.time(), UTC).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{secrets.token_hex(4)}"


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class Recorder:
    """One per gateway: owns the spool, the uploader and the signing key."""

    def __init__(self, store: RecordingStore, spool_dir: Path, key: RecordingKey, *,
                 segment_seconds: float = 5.0, segment_bytes: int = 4 * 1024 * 1024,
                 flush_interval: float = 1.0, failure_policy: str = "strict",
                 spool_budget: int | None = None, upload_concurrency: int = UPLOAD_CONCURRENCY,
                 uploader: Uploader | None = None) -> None:
        self.store = store
        # Who does the PUTs (recorder/uploads.py): these threads, or a child process for S3.
        self.uploader = uploader or ThreadUploader(store)
        self.spool_dir = spool_dir
        self.key = key
        self.segment_seconds = segment_seconds
        self.segment_bytes = segment_bytes
        self.flush_interval = flush_interval
        self.failure_policy = failure_policy
        self.spool_budget = spool_budget
        self.sessions: dict[str, SessionRecording] = {}
        # Counters for metrics: failed upload attempts, objects waiting in the spool, and
        # since when (time.time()) the store has been failing, None while uploads succeed.
        self.upload_errors = 0
        self.uploads_pending = 0
        self.upload_conflicts = 0
        # When each upload in flight started: health and metrics see a hung store (upload_since).
        self._in_flight: dict[object, float] = {}
        # Times a session's recording could not be written to the spool (each opens a gap).
        self.spool_failures = 0
        self.store_down_since: float | None = None
        self.last_upload_error: str | None = None
        # Bytes in the spool, kept up to date as files are written and removed so that
        # spool_full() is cheap enough to ask on every new session.
        self._spool_used = 0
        self._spool_lock = threading.Lock()
        self._spool_resynced = 0.0
        # Uploads run ``upload_concurrency`` at a time (one PUT at a time left sealed segments
        # waiting over a minute at 500 sessions). Queue entries: (sequence, spool path, key).
        self.upload_concurrency = max(1, upload_concurrency)
        self._uploads: asyncio.Queue[tuple[int, Path, str]] = asyncio.Queue()
        self._upload_seq = 0
        # When each waiting object was queued, by sequence (oldest first): the upload lag.
        self._queued_at: dict[int, float] = {}
        # Per session directory: its non-manifest objects not yet uploaded, and an event its
        # manifest waits on until they are.
        self._session_uploads: dict[Path, int] = {}
        self._session_drained: dict[Path, asyncio.Event] = {}
        self._uploaders: list[asyncio.Task[None]] = []
        self._last_upload_ok = 0.0
        # One flusher for every session (not a timer task each): see _flush_sessions.
        self._flusher: asyncio.Task[None] | None = None
        # Called on the event loop with (session id, manifest bytes) once a session's manifest
        # is in the store: the archive index is filled from here (bastion/archive_indexer.py).
        self.on_session_stored: Callable[[str, bytes], None] | None = None
        # Their own threads: the loop's default executor has cpu_count + 4 of them, shared.
        self._upload_executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.upload_concurrency, thread_name_prefix="recorder-upload")
        # Sessions' file work (encode, compress, hash, write, fsync): ops of one session run
        # in order, sessions in parallel.
        self._workers = RECORDER_THREADS
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=self._workers, thread_name_prefix="recorder")

    async def start(self) -> list[str]:
        """Create the spool, seal what a previous process left behind, start uploading.
        Returns the ids of recovered sessions."""
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        recovered = await asyncio.to_thread(self._recover_all)
        self._spool_used = await asyncio.to_thread(self._walk_spool)
        self._spool_resynced = time.monotonic()
        self._start_uploaders()
        return recovered

    def open_session(self, meta: dict[str, Any], term: tuple[int, int] | None = None,
                     session_id: str | None = None) -> SessionRecording:
        rec = SessionRecording(self, session_id or new_session_id(), meta, term)
        self.sessions[rec.id] = rec
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_sessions(), name="recording-flusher")
        return rec

    async def _flush_sessions(self) -> None:
        """Every session's periodic work (flush and fsync, cut by age, resume after a gap),
        while any session is open.

        One task wakes FLUSH_PHASES times per flush interval and handles the sessions due,
        each at most ``flush_interval`` after its last turn; their file work goes to the
        worker threads in a few batches. A timer task and a thread-pool submit per session
        and second cost the event loop a seventh of its time at 700 typing sessions
        (docs/benchmarks.md, "1,000 sessions"), and delayed every keystroke's echo."""
        step = self.flush_interval / FLUSH_PHASES
        while self.sessions:
            await asyncio.sleep(step)
            now = time.monotonic()
            batch: list[_SerialWork] = []
            for rec in list(self.sessions.values()):
                if rec.closed or rec.next_tick > now:
                    continue
                rec.next_tick = now + self.flush_interval - step
                rec.tick(batch)
            self._run_batch(batch)

    def _run_batch(self, batch: list[_SerialWork]) -> None:
        """Drain the sessions' queued ops in a few thread-pool jobs (each session's ops still
        run in order, and never two at once: a session is in at most one batch)."""
        if not batch:
            return
        jobs = min(self._workers, -(-len(batch) // BATCH_SESSIONS))
        for i in range(jobs):
            self._executor.submit(_drain_all, batch[i::jobs])

    async def close(self, timeout: float = 10.0) -> None:
        """Seal live sessions, then give the uploader ``timeout`` seconds to drain the spool."""
        for rec in list(self.sessions.values()):
            await rec.close({"reason": "gateway shutting down"})
        for rec in list(self.sessions.values()):
            if not rec.sealed:
                rec.stop_sealing()
                log.error("ALERT recording of session %s could not be sealed: the spool %s refuses writes (%s); "
                          "it is sealed from the spool at the next start", rec.id, self.spool_dir, rec.failed,
                          extra={"session": rec.id})
        deadline = time.monotonic() + timeout
        while self.uploads_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks = [*self._uploaders, *([self._flusher] if self._flusher else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._executor.shutdown(wait=False)
        self._upload_executor.shutdown(wait=False)
        await asyncio.to_thread(self.uploader.close)
        if self.uploads_pending:
            log.warning("%d recording objects still in the spool %s; they are uploaded at the next start",
                        self.uploads_pending, self.spool_dir)

    async def wait_uploaded(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while self.uploads_pending and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return not self.uploads_pending

    def spool_bytes(self) -> int:
        """Bytes in the spool (tracked, not measured: cheap)."""
        return self._spool_used

    def spool_full(self) -> bool:
        """True when the spool holds more than its budget: the front door then refuses new
        sessions (sessions already running go on). Cheap: compares a tracked counter; only
        when over budget, at most every 5 s, the counter is checked against the disk."""
        if self.spool_budget is None or self._spool_used <= self.spool_budget:
            return False
        now = time.monotonic()
        if now - self._spool_resynced >= 5.0:
            self._spool_resynced = now
            with self._spool_lock:
                self._spool_used = self._walk_spool()
        return self._spool_used > self.spool_budget

    def spool_full_reason(self) -> str:
        """Why new sessions are refused, for the user and the log (call when spool_full())."""
        used, budget = human_size(self._spool_used, byte_unit="bytes"), human_size(self.spool_budget or 0, byte_unit="bytes")
        why = f"the recording spool {self.spool_dir} holds {used}, over its budget of {budget}"
        if self.store_down_since is not None:
            why += f", because the recordings store has been unreachable since {iso(self.store_down_since)}"
        return why + "; new sessions are refused until the recordings are uploaded"

    def _spool_add(self, n: int) -> None:
        if n:
            with self._spool_lock:
                self._spool_used = max(0, self._spool_used + n)

    def _walk_spool(self) -> int:
        return _tree_bytes(self.spool_dir)

    # -- upload ------------------------------------------------------------------

    def oldest_pending_upload(self) -> float | None:
        """When (time.time()) the oldest object still waiting for upload was queued."""
        for queued in self._queued_at.values():  # insertion order: the first is the oldest
            return queued
        return None

    @property
    def upload_since(self) -> float | None:
        """When the oldest upload still in flight started (None when none is): a store that
        hangs shows as an upload that never ends."""
        return min(self._in_flight.values(), default=None)

    def queue_upload(self, path: Path, key: str) -> None:
        self.uploads_pending += 1
        self._upload_seq += 1
        self._queued_at[self._upload_seq] = time.time()
        if path.name != "manifest.json":
            self._session_uploads[path.parent] = self._session_uploads.get(path.parent, 0) + 1
        self._uploads.put_nowait((self._upload_seq, path, key))

    def _start_uploaders(self) -> None:
        self._uploaders = [asyncio.create_task(self._upload_loop(), name=f"recording-uploader-{i}")
                           for i in range(self.upload_concurrency)]

    async def _upload_loop(self) -> None:
        """One of ``upload_concurrency`` workers sharing the queue. Objects of one session may go
        up in parallel, except its manifest: it waits until every object queued before it for
        that session is in the store, so a reader never sees a manifest naming a segment that
        is not there yet, and the spool directory is removed only once everything is up."""
        while True:
            seq, path, key = await self._uploads.get()
            try:
                if path.name == "manifest.json":
                    await self._session_uploaded(path.parent)
                stored = await self._upload_with_retries(path, key)
                if stored is not None and path.name == "manifest.json" and self.on_session_stored:
                    self.on_session_stored(path.parent.name, stored)
            finally:
                self.uploads_pending -= 1
                self._queued_at.pop(seq, None)
                if path.name != "manifest.json":
                    self._one_session_upload_done(path.parent)

    async def _session_uploaded(self, session_dir: Path) -> None:
        while self._session_uploads.get(session_dir, 0) > 0:
            event = self._session_drained.setdefault(session_dir, asyncio.Event())
            await event.wait()

    def _one_session_upload_done(self, session_dir: Path) -> None:
        left = self._session_uploads.get(session_dir, 1) - 1
        if left > 0:
            self._session_uploads[session_dir] = left
            return
        self._session_uploads.pop(session_dir, None)
        event = self._session_drained.pop(session_dir, None)
        if event is not None:
            event.set()

    async def _upload_with_retries(self, path: Path, key: str) -> bytes | None:
        """Upload until the store takes the object; returns its bytes (None when it could not
        be: a conflict, or the spool copy vanished)."""
        delay = 0.2
        while True:
            started = time.monotonic()
            attempt = object()
            self._in_flight[attempt] = time.time()
            try:
                try:
                    data = await asyncio.get_running_loop().run_in_executor(
                        self._upload_executor, self._upload_one, path, key)
                finally:
                    del self._in_flight[attempt]
            except StoreConflict as exc:
                # The store answered, but retrying cannot help: set the object aside so
                # that it does not hold up every later upload.
                self.upload_errors += 1
                self.upload_conflicts += 1
                try:
                    kept = await asyncio.to_thread(self._set_aside, path)
                except OSError:
                    kept = path
                log.error("recording object %s NOT uploaded: %s; the spool copy is kept in %s", key, exc, kept)
                return None
            except FileNotFoundError:
                log.error("spooled recording object %s vanished before its upload to %s (is the spool %s "
                          "shared with another gateway?)", path, key, self.spool_dir)
                return None
            except Exception as exc:  # noqa: BLE001 - whatever it is, the uploader must not die
                self.upload_errors += 1
                self.last_upload_error = str(exc) if isinstance(exc, StoreError | OSError) else repr(exc)
                # An attempt that began before another one succeeded says nothing new: with
                # several in flight, it must not open a second outage (and a second warning).
                if self.store_down_since is None and started >= self._last_upload_ok:
                    # One warning per outage; the retries log at debug level only.
                    self.store_down_since = time.time()
                    log.warning("cannot upload recordings to %s: %s; sessions go on, their recordings wait "
                                "in the spool %s and uploads are retried until the store answers",
                                self.store.url, self.last_upload_error, self.spool_dir,
                                exc_info=not isinstance(exc, StoreError | OSError))
                else:
                    log.debug("upload of %s still failing (%s); next try in %.1fs", key,
                              self.last_upload_error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            self._last_upload_ok = time.monotonic()
            if self.store_down_since is not None:
                log.warning("recordings store %s answers again after %.1fs; uploading the %d objects "
                            "waiting in the spool", self.store.url, time.time() - self.store_down_since,
                            self.uploads_pending - 1)
                self.store_down_since = None
            return data

    def _upload_one(self, path: Path, key: str) -> bytes:
        uploaded = self.uploader.put_file(path, key)
        if path.name == "manifest.json":
            size = _tree_bytes(path.parent)
            shutil.rmtree(path.parent, ignore_errors=True)
            self._spool_add(-size)
        else:
            path.unlink()
            self._spool_add(-uploaded.size)
        return uploaded.data or b""

    def _set_aside(self, path: Path) -> Path:
        """Move a spooled object the store refused out of the session directory (a refused
        manifest takes its whole directory, so that the next start does not re-seal it)."""
        target_dir = self.spool_dir / CONFLICTS_DIR / path.parent.name
        target_dir.mkdir(parents=True, exist_ok=True)
        if path.name == "manifest.json":
            for item in path.parent.iterdir():
                os.replace(item, target_dir / item.name)
            shutil.rmtree(path.parent, ignore_errors=True)
            return target_dir
        os.replace(path, target_dir / path.name)
        return target_dir / path.name

    # -- recovery after a crash ----------------------------------------------------

    def _recover_all(self) -> list[str]:
        recovered = []
        for session_dir in sorted(p for p in self.spool_dir.iterdir() if p.is_dir() and not p.name.startswith(".")):
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
        if was_open and not (session_dir / "meta.json").exists() and not any(session_dir.glob("seg-*")):
            # Died between creating the directory and writing the metadata: nothing was recorded.
            shutil.rmtree(session_dir, ignore_errors=True)
            return False
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
        # What the archive index needs of this session, collected as markers are recorded and
        # written into the manifest (recorder/index.py): commands, and masking markers' values.
        self._index = SessionIndexNotes()
        self._encoders = {c: ev.StreamEncoder(c) for c in ("o", "e", "i")}
        # Each segment's search summary (recorder/summary.py), fed in the worker thread.
        self._summary = search_summary.SummaryBuilder() if search_summary.ENABLED else None
        self._screen = ScreenTracker(*term) if term else None
        self._snap_t = 0.0
        self._snap_bytes = 0
        self._buf: list[bytes | tuple[float, str, bytes]] = []
        self._buf_len = 0
        self._buf_events = 0
        # Frames written since the last fsync (the tick syncs only when there are some).
        self._unsynced = False
        self._seg_raw = 0.0
        self._seg_t = 0.0
        # Encoded bytes per terminal byte of the last flush, set by the worker: segments are cut
        # by their encoded size (what a reader holds in memory), which the loop only knows by
        # this estimate. A run of zeros encodes to almost nothing, text to about its own size.
        self._encoded_ratio = 1.0
        self._last_t = 0.0
        self._inflight = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._chain: list[SegmentRecord] = []
        self._writer: SegmentWriter | None = None
        self._inflight_lock = threading.Lock()
        self._fail_reported = False
        # Spool failures (docs/recording-format.md, "Gaps"): while ``_gap`` is set, file work is
        # skipped and counted as lost; best_effort tries to resume every flush interval, and
        # the close seals what the spool holds (retrying until the spool takes it) whatever
        # the policy, so that no recording stays unsealed until a restart.
        self._gap: dict[str, Any] | None = None
        self._gaps: list[dict[str, Any]] = []
        self._resuming = False
        self._opened = False
        self._queued_segments: set[int] = set()
        self._final_sealed = False
        self.sealed = False
        self._final_end: dict[str, Any] = {}
        self._sealer: asyncio.Task[None] | None = None
        self._loop = asyncio.get_running_loop()
        self._work = _SerialWork(recorder._executor, self._run_op)
        # When the recorder's flusher next gives this session its turn (tick).
        self.next_tick = time.monotonic() + recorder.flush_interval
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
        if self._screen is not None and stream == "o":
            self._screen.feed(data)
            self._snap_bytes += len(data)
        self._append((t, stream, data), t, len(data))

    def input(self, data: bytes) -> None:
        if data:
            self.counts["i"] += len(data)
            t = self.now()
            self._append((t, "i", data), t, len(data))

    def input_at(self, t: float, data: bytes) -> None:
        """Input typed at ``t`` but recorded later (the echo detector holds keystrokes briefly)."""
        if data:
            self.counts["i"] += len(data)
            t = max(t, self._last_t)
            self._append((t, "i", data), t, len(data))

    def resize(self, cols: int, rows: int) -> None:
        if self._screen is not None:
            screen, (tail, dropped) = self._screen, self._screen.take()

            def apply_resize() -> None:
                screen.apply(tail, dropped)
                screen.resize(cols, rows)

            self._submit(apply_resize, 0)
        t = self.now()
        self._append(ev.encode(t, "r", f"{cols}x{rows}"), t)

    def _takes_events(self) -> bool:
        return not (self.closed or (self.failed and self.recorder.failure_policy == "strict"))

    def marker(self, kind: str, **fields: Any) -> None:
        self.markers[kind] = self.markers.get(kind, 0) + 1
        t = self.now()
        if self._takes_events():  # the index names only markers the segments hold
            self._index.marker(t, kind, fields, self.meta.get("command"))
        self._append(ev.encode(t, "m", {"type": kind, **fields}), t)

    def marker_json(self, kind: str, key: str, raw: bytes, **fields: Any) -> None:
        """:meth:`marker` with the field ``key`` given as JSON text (``raw``), last."""
        self.markers[kind] = self.markers.get(kind, 0) + 1
        t = self.now()
        if self._takes_events():
            self._index.marker_json(t, kind, key, raw, fields, self.meta.get("command"))
        self._append(ev.encode_with_json(t, "m", {"type": kind, **fields}, key, raw), t)

    def exit(self, status: int | None, signal: str | None = None, reason: str | None = None) -> None:
        t = self.now()
        self._append((t, "flush", b""), t, 0)  # a UTF-8 character left incomplete is kept, as bytes
        self._append(ev.encode(t, "x", {"status": status, "signal": signal, "reason": reason}), t)

    async def sync(self) -> None:
        """Wait until every event so far is fsynced in the spool and sealed segments are queued."""
        self._flush(sync=True)
        await self._barrier()

    async def _barrier(self) -> None:
        """Wait until the worker has run every op submitted so far."""
        done = self._loop.create_future()
        self._submit(lambda: self._loop.call_soon_threadsafe(_resolve, done), 0, always=True)
        await done

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
        end = {"ended_at": iso(time.time()), "duration": round(self.now(), 3),
               "bytes": dict(self.counts), "markers": dict(self.markers), **(end or {})}
        items, size = self._take()
        t_end = self._last_t
        self._final_end = end
        self._submit(lambda: self._op_final(items, t_end), size, always=True)
        await self._barrier()
        if self.sealed:
            self.recorder.sessions.pop(self.id, None)
        else:
            # The spool refused the seal: try again until it takes it (space freed, disk back).
            self._sealer = asyncio.create_task(self._seal_later(), name=f"recording-sealer-{self.id}")

    def stop_sealing(self) -> None:
        if self._sealer is not None:
            self._sealer.cancel()

    async def _seal_later(self) -> None:
        delay = min(self.recorder.flush_interval, 0.5)
        while not self.sealed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
            self._submit(self._op_final_retry, 0, always=True)
            await self._barrier()
        self.recorder.sessions.pop(self.id, None)
        log.warning("recording of session %s sealed: the spool %s takes writes again", self.id, self.dir,
                    extra={"session": self.id})

    # -- buffering and segment cutting --------------------------------------------------

    def _append(self, item: bytes | tuple[float, str, bytes], t: float, size: int | None = None) -> None:
        """Queue an event: an encoded line, or (t, stream, bytes) that the worker thread encodes.

        Encoding stream data as JSON costs about as much CPU as relaying it, so it happens
        off the event loop; sizes here are the terminal's bytes, not the encoded ones."""
        if not self._takes_events():
            return
        size = len(item) if size is None else size
        self._last_t = max(self._last_t, t)
        self._buf.append(item)
        self._buf_len += size
        self._buf_events += 1
        self._seg_raw += size * self._encoded_ratio if isinstance(item, tuple) else size
        if self._seg_raw >= self.recorder.segment_bytes:
            self._cut()
        elif self._buf_len >= FRAME_BYTES and (self._buf_len * self._encoded_ratio >= FRAME_BYTES
                                               or self._buf_len >= FRAME_BYTES_MAX):
            self._flush(sync=False)

    def _take(self) -> tuple[list[bytes | tuple[float, str, bytes]], int]:
        items, size = self._buf, self._buf_len
        self._buf, self._buf_len, self._buf_events = [], 0, 0
        return items, size

    def _encode(self, items: list[bytes | tuple[float, str, bytes]]) -> tuple[bytes, int]:
        """Worker thread: the JSON lines for queued events, and how many there are.

        Reads of one stream less than MERGE_SECONDS apart become one event (bulk output
        arrives in 32 KiB packets; one line per packet would cost more to encode than to
        relay), stamped with the first read's time."""
        lines: list[bytes] = []
        run: list[bytes] = []
        run_t, run_stream = 0.0, ""
        for item in items:
            if not isinstance(item, bytes) and item[1] == run_stream and item[0] - run_t <= MERGE_SECONDS:
                run.append(item[2])
                continue
            if run:
                lines.append(self._encode_run(run_stream, run_t, run))
                run, run_stream = [], ""
            if isinstance(item, bytes):
                lines.append(item)
                if self._summary is not None:
                    self._summary.marker(item)
            elif item[1] == "flush":
                lines += [self._flush_encoder(code, item[0]) for code in self._encoders]
            else:
                run_t, run_stream, run = item[0], item[1], [item[2]]
        if run:
            lines.append(self._encode_run(run_stream, run_t, run))
        raw = b"".join(lines)
        stream_bytes = sum(len(item[2]) for item in items if isinstance(item, tuple))
        if stream_bytes >= 4096:
            self._encoded_ratio = min(max(len(raw) / stream_bytes, MIN_RATIO), 2.0)
        # One line per event (JSON escapes newlines inside strings); counted per line, not by
        # a pass over the bytes (bytes.count was 0.5 CPU s/GB of text).
        return raw, sum(1 for line in lines if line)

    def _encode_run(self, stream: str, t: float, run: list[bytes]) -> bytes:
        data = b"".join(run)
        line = self._encoders[stream].encode(t, data)
        if self._summary is not None:
            self._summary.run(stream, data, line)
        return line

    def _flush_encoder(self, stream: str, t: float) -> bytes:
        line = self._encoders[stream].flush(t)
        if self._summary is not None:
            self._summary.flushed(stream, line)
        return line

    def _summarised(self, record: SegmentRecord) -> SegmentRecord:
        if self._summary is None:
            return record
        return dataclasses.replace(record, summary=self._summary.seal(record.index))

    def _flush(self, sync: bool, batch: list[_SerialWork] | None = None) -> None:
        self._unsynced = not sync
        items, size = self._take()
        t_end = self._last_t
        self._submit(lambda: self._writer_append(items, t_end, sync), size, batch=batch)

    def _cut(self, final: bool = False, end: dict[str, Any] | None = None,
             batch: list[_SerialWork] | None = None) -> None:
        self._unsynced = True  # the next segment's header waits for the next flush
        items, size = self._take()
        t_end = self._last_t
        next_t = self._last_t
        # Snapshots cost emulator time: see recorder/snapshot.py for how often one is taken.
        screen_tail = None
        if not final and self._screen is not None and snapshot_due(next_t - self._snap_t, self._snap_bytes):
            screen_tail = self._screen.take()
            self._snap_t, self._snap_bytes = next_t, 0
        self._seg_raw = 0.0
        self._seg_t = next_t
        self._submit(lambda: self._op_seal(items, t_end, final, screen_tail, next_t, end), size, batch=batch)

    def tick(self, batch: list[_SerialWork]) -> None:
        """The recorder's flusher, once per flush interval: file work goes into ``batch``."""
        if self._gap is not None:
            if self.recorder.failure_policy == "best_effort" and not self._resuming:
                self._resuming = True
                self._submit(self._op_resume, 0, always=True, batch=batch)
            return
        if self._seg_raw and self.now() - self._seg_t >= self.recorder.segment_seconds:
            self._cut(batch=batch)
        elif self._buf or self._unsynced:
            # An idle session costs nothing here: no thread hop, no fsync of nothing
            # (1,000 idle sessions were 1,000 fsyncs a second).
            self._flush(sync=True, batch=batch)

    # -- the ordered file-work queue (runs in threads) -----------------------------------

    def _submit(self, op: Callable[[], Any], size: int, always: bool = False,
                batch: list[_SerialWork] | None = None) -> None:
        """Queue file work for the session's worker; ``always`` ops run even after a strict
        failure (they only signal the event loop). With ``batch``, the worker is started
        by the recorder's flusher together with others."""
        with self._inflight_lock:
            self._inflight += size
            if self._inflight > HIGH_WATER:
                self._drained.clear()
        self._work.submit(op, size, always, batch)

    def _run_op(self, op: Callable[[], Any], size: int, always: bool) -> None:
        """Worker thread: one op, in submission order. Failures are reported to the loop."""
        try:
            if always or self._gap is None:
                op()
            else:
                self._gap["lost_bytes"] += size  # the spool failed and has not taken writes since
        except Exception as exc:  # noqa: BLE001 - any failure to record is the session's failure
            if not isinstance(exc, OSError | StoreError | ValueError):
                log.exception("recording of session %s failed unexpectedly", self.id)
            if self._gap is None:
                # From the last event the spool holds: everything after it is in the gap.
                since = self._writer.t_end if self._writer is not None else self.now()
                self._gap = {"from": round(since, 3), "lost_bytes": 0, "reason": _why(exc)}
                self.recorder.spool_failures += 1
            self._gap["lost_bytes"] += size
            self.failed = self.failed or exc
            self._loop.call_soon_threadsafe(self._fail, exc)
        finally:
            with self._inflight_lock:
                self._inflight -= size
                wake = self._inflight <= LOW_WATER and not self._drained.is_set()
            if wake:
                self._loop.call_soon_threadsafe(self._drained.set)

    def _fail(self, exc: Exception) -> None:
        """Event loop: the spool refused an op (the worker already set ``failed``)."""
        self.failed = self.failed or exc
        if not self._fail_reported:
            self._fail_reported = True
            then = ("the session is ended" if self.recorder.failure_policy == "strict" else
                    "the session goes on unrecorded; recording resumes when the spool takes writes again")
            log.error("ALERT recording of session %s cannot reach the spool %s: %s (failure_policy %s: %s)",
                      self.id, self.dir, exc, self.recorder.failure_policy, then, extra={"session": self.id})
            self._drained.set()
            if self.on_failure and not self.closed:
                self.on_failure(exc)

    def _op_open(self, snapshot: dict[str, Any] | None) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        meta = json.dumps(self.meta, ensure_ascii=False, indent=1).encode()
        for name in ("meta.json", "start.json"):
            _write_file(self.dir / name, meta)
        self.recorder._spool_add(2 * len(meta))
        self.recorder_loop_call(lambda: self.recorder.queue_upload(self.dir / "start.json", self.prefix + "start.json"))
        self._opened = True
        self._writer = self._new_writer(0, None, 0.0, snapshot)

    def _new_writer(self, index: int, prev: str | None, t: float, snapshot: dict[str, Any] | None) -> SegmentWriter:
        path = self.dir / (segment_name(index) + ".open")
        writer = SegmentWriter(path, index, make_header(self.id, index, prev, t, snapshot), t, snapshot is not None)
        self.recorder._spool_add(writer.size)
        return writer

    def _writer_append(self, items: list[bytes | tuple[float, str, bytes]], t_end: float, sync: bool) -> None:
        assert self._writer is not None
        raw, n = self._encode(items)
        before = self._writer.size
        self._writer.append(raw, n, t_end, sync)
        self.recorder._spool_add(self._writer.size - before)

    def _op_seal(self, items: list[bytes | tuple[float, str, bytes]], t_end: float, final: bool,
                 screen_tail: tuple[bytes, bool] | None, next_t: float, end: dict[str, Any] | None) -> None:
        raw, n = self._encode(items)
        snapshot = None
        if screen_tail is not None and self._screen is not None:
            self._screen.apply(*screen_tail)
            snapshot = self._screen.snapshot()
        writer = self._writer
        assert writer is not None
        before = writer.size
        writer.append(raw, n, t_end, sync=False)
        self.recorder._spool_add(writer.size - before)
        name = segment_name(writer.index)
        self._writer = None  # sealing closes its file: never written again, whatever fails below
        record = self._summarised(writer.seal(self.dir / name))
        self._chain.append(record)
        self.recorder._spool_add(_append_chain(self.dir, record))
        self._queue_segment(record.index)
        if final:
            self._writer = None
            self.recorder._spool_add(_write_manifest(self.dir, self.recorder.key, self.meta, end or {}, self._chain,
                                                     index=self._index.to_manifest()))
            self.recorder_loop_call(
                lambda: self.recorder.queue_upload(self.dir / "manifest.json", self.prefix + "manifest.json"))
        else:
            self._writer = self._new_writer(writer.index + 1, record.sha256, next_t, snapshot)

    def recorder_loop_call(self, fn: Callable[[], None]) -> None:
        self._loop.call_soon_threadsafe(fn)

    def _queue_segment(self, index: int) -> None:
        if index not in self._queued_segments:
            self._queued_segments.add(index)
            name = segment_name(index)
            self.recorder_loop_call(lambda: self.recorder.queue_upload(self.dir / name, self.prefix + name))

    # -- after a spool failure (worker thread) -----------------------------------------------------

    def _op_resume(self) -> None:
        """best_effort: try to take writes again; on success the gap is marked and closed."""
        try:
            self._repair()
        except OSError as exc:
            log.debug("spool %s still refuses session %s: %s", self.dir, self.id, exc)
            return
        finally:
            self._resuming = False
        log.warning("recording of session %s resumes: the spool takes writes again (%.1fs not recorded)",
                    self.id, self._gaps[-1]["to"] - self._gaps[-1]["from"], extra={"session": self.id})
        self.failed = None
        self._fail_reported = False

    def _repair(self) -> None:
        """Bring the spool back in line with what the session holds, then mark the gap.

        The session directory and its metadata are written again if the failure came before
        them; a segment sealed on disk but not chained is chained; ``chain.jsonl`` is
        rewritten whole (an append may have left half a line); the open segment keeps its
        complete frames (a failed write may have left part of one) or starts anew. Raises
        OSError while the spool still refuses."""
        if self._summary is not None:
            self._summary.taint()  # what it was fed may not all be in the spool
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.abandon()
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self._opened:
            meta = json.dumps(self.meta, ensure_ascii=False, indent=1).encode()
            for name in ("meta.json", "start.json"):
                _write_file(self.dir / name, meta)
            self.recorder_loop_call(
                lambda: self.recorder.queue_upload(self.dir / "start.json", self.prefix + "start.json"))
            self._opened = True
        index = len(self._chain)
        if (self.dir / segment_name(index)).exists():
            self._chain.append(_record_from_file(self.dir / segment_name(index), index))
            index += 1
        _write_file(self.dir / "chain.jsonl", b"".join((json.dumps(r.to_dict()) + "\n").encode() for r in self._chain))
        for record in self._chain:
            self._queue_segment(record.index)
        t = self.now()
        self._writer = _reopen_segment(self.dir, self.id, index, self._chain[-1].sha256 if self._chain else None, t)
        if self._gap is not None:
            gap = {**self._gap, "to": round(t, 3)}
            self._writer.append(ev.encode(t, "m", {"type": "gap", **gap}), 1, t, sync=True)
            self._gaps.append(gap)
            self._gap = None

    def _op_final(self, items: list[bytes | tuple[float, str, bytes]], t_end: float) -> None:
        """Seal the last segment and write the manifest; after a spool failure, first repair
        (marking the gap up to the end). Each step is done once, so a retry picks up where the
        spool refused."""
        if not self._final_sealed:
            if self._gap is not None or self._writer is None:
                if self._gap is not None:  # queued while the spool refused: inside the gap
                    self._gap["lost_bytes"] += sum(len(i[2]) if isinstance(i, tuple) else 0 for i in items)
                    items = []
                self._repair()
            assert self._writer is not None
            raw, n = self._encode(items) if items else (b"", 0)
            before = self._writer.size
            self._writer.append(raw, n, t_end, sync=False)
            self.recorder._spool_add(self._writer.size - before)
            writer, self._writer = self._writer, None
            record = self._summarised(writer.seal(self.dir / segment_name(writer.index)))
            self._chain.append(record)
            self._final_sealed = True
            self.recorder._spool_add(_append_chain(self.dir, record))
            self._queue_segment(record.index)
        for chained in self._chain:  # an append to chain.jsonl may have failed before the queueing
            self._queue_segment(chained.index)
        end = {**self._final_end, **({"gaps": self._gaps} if self._gaps else {})}
        # The archive index's entries (docs/recording-format.md): without them, indexing the
        # session re-reads every segment from the store (decompress and decode everything
        # recorded: more CPU per GB than recording it). Not after a gap: markers queued
        # while the spool refused are not in the segments, and the index must not name them.
        index = self._index.to_manifest() if not self._gaps and self.failed is None else None
        self.recorder._spool_add(_write_manifest(self.dir, self.recorder.key, self.meta, end, self._chain,
                                                 index=index))
        self.sealed = True
        self.recorder_loop_call(
            lambda: self.recorder.queue_upload(self.dir / "manifest.json", self.prefix + "manifest.json"))

    def _op_final_retry(self) -> None:
        try:
            self._op_final([], self._last_t)
        except OSError as exc:
            log.debug("spool %s still refuses the seal of session %s: %s", self.dir, self.id, exc)


class _SerialWork:
    """Runs one session's ops in order on a shared thread pool, back to back.

    A worker drains the session's queue until it is empty, so consecutive ops do not wait
    for the event loop between them (``asyncio.to_thread`` per op did, and under load the
    worker sat idle for most of each round trip)."""

    def __init__(self, executor: concurrent.futures.Executor,
                 run: Callable[[Callable[[], Any], int, bool], None]) -> None:
        self._executor = executor
        self._run = run
        self._queue: collections.deque[tuple[Callable[[], Any], int, bool]] = collections.deque()
        self._lock = threading.Lock()
        self._busy = False

    def submit(self, op: Callable[[], Any], size: int, always: bool,
               batch: list[_SerialWork] | None = None) -> None:
        """Queue ``op``; start draining unless a drain is under way. With ``batch`` the
        drain is left to whoever runs the batch (:func:`_drain_all`)."""
        with self._lock:
            self._queue.append((op, size, always))
            if self._busy:
                return
            self._busy = True
        if batch is None:
            self._executor.submit(self.drain)
        else:
            batch.append(self)

    def drain(self) -> None:
        while True:
            with self._lock:
                if not self._queue:
                    self._busy = False
                    return
                op, size, always = self._queue.popleft()
            self._run(op, size, always)


def _drain_all(works: list[_SerialWork]) -> None:
    """Worker thread: drain several sessions' queues, one after the other."""
    for work in works:
        try:
            work.drain()
        except Exception:  # noqa: BLE001 - _run_op reports op failures; this is a bug, not theirs
            log.exception("recording worker failed")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


# -- helpers shared by live sessions and recovery ----------------------------------------


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _write_file(path: Path, data: bytes) -> int:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    return len(data)


def _append_chain(session_dir: Path, record: SegmentRecord) -> int:
    line = (json.dumps(record.to_dict()) + "\n").encode()
    with open(session_dir / "chain.jsonl", "ab") as f:
        f.write(line)
        f.flush()
        os.fsync(f.fileno())
    return len(line)


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
                         float(header["t"]), t_end, len(events), header.get("snapshot") is not None)


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


def _why(exc: Exception) -> str:
    return f"the spool could not be written: {exc.strerror or exc}" if isinstance(exc, OSError) else str(exc)


def _reopen_segment(session_dir: Path, sid: str, index: int, prev: str | None, t: float) -> SegmentWriter:
    """The open segment ``index`` cut back to its complete frames, ready for appending; a new
    one when it has none (a failed write may have left part of a frame, or no header)."""
    path = session_dir / (segment_name(index) + ".open")
    data = path.read_bytes() if path.exists() else b""
    raw, good, _ = read_frames(data)
    header_line, _, rest = raw.partition(b"\n")
    if not header_line:
        return SegmentWriter(path, index, make_header(sid, index, prev, t, None), t)
    kept = data[:good]
    t_last = float(json.loads(header_line)["t"])
    for e in ev.decode_lines(rest):
        t_last = max(t_last, e.t)
    with open(path, "r+b") as f:
        f.truncate(good)
        f.flush()
        os.fsync(f.fileno())
    writer = SegmentWriter.__new__(SegmentWriter)
    _resume_writer(writer, path, index, kept, t_last)
    return writer


def _resume_writer(writer: SegmentWriter, path: Path, index: int, kept: bytes, t_last: float) -> None:
    """Reopen a partly written segment for appending, rebuilding its running hash and sizes."""
    import hashlib

    import zstandard

    raw, _, _ = read_frames(kept)
    header = json.loads(raw.partition(b"\n")[0])
    writer.path = path
    writer.index = index
    writer.t_start = float(header["t"])
    writer.snapshot = header.get("snapshot") is not None
    writer.t_end = t_last
    writer.raw_size = len(raw)
    writer.size = len(kept)
    writer.events = sum(1 for line in raw.split(b"\n")[1:] if line)
    writer._hash = hashlib.sha256(kept)
    writer._cctx = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
    writer._fd = os.open(path, os.O_WRONLY | os.O_APPEND)


def _write_manifest(session_dir: Path, key: RecordingKey, meta: dict[str, Any], end: dict[str, Any],
                    chain: list[SegmentRecord], index: dict[str, Any] | None = None) -> int:
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
    if index is not None:
        body["index"] = index
    manifest = {**body, "signature": key.sign(body)}
    return _write_file(session_dir / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=1).encode())
