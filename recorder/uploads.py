"""Putting spooled recording objects into the store: in the recorder's threads, or in a child
process.

An upload's CPU is mostly the S3 client's: botocore builds, signs and parses every request in
Python, about 1.5 ms of CPU per PUT. At 1,000 typing sessions with 5 s segments that is 200
PUTs a second, and in the gateway's process every one of those milliseconds holds the GIL
that relays keystrokes (docs/benchmarks.md, "1,000 sessions"). :class:`ProcessUploader` does
the PUTs in a child process, on another core; the gateway only passes (path, key) over a
pipe and waits, without the GIL, for the answer.

The contract is the same either way (:class:`Uploader`): ``put_file`` reads the spooled file,
creates its key in the store, and returns what the recorder needs to account for it; a key
already holding the same bytes counts as uploaded (a previous process died between the PUT
and removing its spool copy), one holding other bytes raises :class:`StoreConflict`.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import logging
import multiprocessing
import pickle
import signal
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, NamedTuple, Protocol
from urllib.parse import urlparse

from recorder.objects import ObjectExists, RecordingStore, StoreError

log = logging.getLogger(__name__)

# Threads in the child: PUTs in flight at once (the recorder's own upload concurrency).
CHILD_THREADS = 8


class Uploaded(NamedTuple):
    size: int
    # The object's bytes for a manifest (the archive index reads it), None for the rest: a
    # segment's bytes are not sent back over the pipe.
    data: bytes | None


class StoreConflict(StoreError):
    """The store holds a different object under this key: retrying cannot help."""


class Uploader(Protocol):
    def put_file(self, path: Path, key: str) -> Uploaded:
        """Blocking: put the spooled file ``path`` under ``key``. Raises StoreError (or
        StoreConflict), or FileNotFoundError when the spool copy is gone."""

    def close(self) -> None: ...


def put_file(store: RecordingStore, path: Path, key: str) -> Uploaded:
    data = path.read_bytes()
    try:
        store.put(key, data)
    except ObjectExists:
        if store.get(key) != data:
            raise StoreConflict(f"{key} already exists in {store.url} with different content") from None
    return Uploaded(len(data), data if path.name == "manifest.json" else None)


class ThreadUploader:
    """PUTs in the calling thread (the recorder's upload threads): the local folder's way."""

    def __init__(self, store: RecordingStore) -> None:
        self.store = store

    def put_file(self, path: Path, key: str) -> Uploaded:
        return put_file(self.store, path, key)

    def close(self) -> None:
        pass


class _Child:
    """One child process, its pipe, and the requests it has not answered yet."""

    def __init__(self, factory: Callable[[], RecordingStore], threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # never fork a process with threads and a loop
        self.conn, child_end = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child_end, factory, threads), name="guarita-uploads",
                                daemon=True)
        self.proc.start()
        child_end.close()
        self.pending: dict[int, concurrent.futures.Future[tuple[str, Any]]] = {}
        self.lock = threading.Lock()  # sends, and pending against the reader
        self.dead = False
        threading.Thread(target=self._read, name="recorder-upload-replies", daemon=True).start()

    def send(self, req: int, path: Path, key: str) -> concurrent.futures.Future[tuple[str, Any]]:
        future: concurrent.futures.Future[tuple[str, Any]] = concurrent.futures.Future()
        with self.lock:
            if self.dead:
                raise StoreError("the upload process has exited; it is restarted for the next try")
            self.pending[req] = future
            try:
                self.conn.send((req, str(path), key))
            except (OSError, ValueError) as exc:
                self.pending.pop(req, None)
                raise StoreError(f"cannot reach the upload process: {exc}") from None
        return future

    def _read(self) -> None:
        while True:
            try:
                req, result = self.conn.recv()
            except (EOFError, OSError):
                break
            with self.lock:
                future = self.pending.pop(req, None)
            if future is not None:
                future.set_result(result)
        self.proc.join(5)
        with self.lock:
            self.dead = True
            orphans, self.pending = list(self.pending.values()), {}
        if orphans:
            log.warning("the recordings upload process exited (code %s) with %d uploads in flight; they are retried",
                        self.proc.exitcode, len(orphans))
        for future in orphans:
            future.set_result(("error", StoreError(f"the upload process exited (code {self.proc.exitcode})")))

    def stop(self, timeout: float) -> None:
        try:
            with self.lock:
                self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(1)
        self.conn.close()


class ProcessUploader:
    """PUTs in a child process (started at the first upload, restarted if it dies) built from
    ``factory``, which must be picklable (e.g. ``functools.partial(open_store, url, ...)``)."""

    def __init__(self, factory: Callable[[], RecordingStore], threads: int = CHILD_THREADS) -> None:
        self._factory = factory
        self._threads = threads
        self._child: _Child | None = None
        self._start_lock = threading.Lock()
        self._ids = itertools.count()
        self._closed = False

    def put_file(self, path: Path, key: str) -> Uploaded:
        status, value = self._running().send(next(self._ids), path, key).result()
        if status == "error":
            raise value
        result: Uploaded = value
        return result

    def _running(self) -> _Child:
        with self._start_lock:
            if self._closed:
                raise StoreError("the recorder is closed")
            if self._child is None or self._child.dead:
                self._child = _Child(self._factory, self._threads)
            return self._child

    def close(self, timeout: float = 5.0) -> None:
        with self._start_lock:
            self._closed = True
            child, self._child = self._child, None
        if child is not None:
            child.stop(timeout)


def _serve(conn: Connection, factory: Callable[[], RecordingStore], threads: int) -> None:
    """The child: put each requested file, answer (request id, ("ok", Uploaded) | ("error", exc))."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the gateway decides when uploads stop
    store = factory()
    send_lock = threading.Lock()

    def handle(req: int, path: str, key: str) -> None:
        result: tuple[str, Any]
        try:
            result = ("ok", put_file(store, Path(path), key))
        except BaseException as exc:  # noqa: BLE001 - every failure goes back to the recorder, which retries
            result = ("error", _picklable(exc))
        with send_lock:
            try:
                conn.send((req, result))
            except (OSError, ValueError):
                pass  # the gateway is gone

    with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="upload") as pool:
        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                break
            if message is None:
                break
            pool.submit(handle, *message)


def _picklable(exc: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any exception that does not survive the pipe is sent as text
        return StoreError(f"{type(exc).__name__}: {exc}")
    return exc


def uploader_for(url: str, lock_mode: str, retention: float, store: RecordingStore) -> Uploader:
    """A child process for an S3 URL (its PUTs are what cost CPU), the recorder's threads for
    a local folder (a copy and an fsync)."""
    if urlparse(url).scheme != "s3":
        return ThreadUploader(store)
    from recorder.store import open_store

    return ProcessUploader(functools.partial(open_store, url, lock_mode, retention))
