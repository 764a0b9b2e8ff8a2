"""Where recordings live: one interface, a local folder today and S3 (Object Lock) beside it.

Every object is written once. The interface is synchronous and blocking (boto3 is);
the recorder calls it from worker threads.
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlparse

# The store's errors and interface (re-exported: ``from recorder.store import NotFound`` works).
from recorder.objects import (
    NotFound,
    ObjectExists,
    ObjectInfo,
    ObjectNotFound,
    RecordingStore,
    StoreError,
)

__all__ = ["FileStore", "NotFound", "ObjectExists", "ObjectInfo", "ObjectNotFound", "RecordingStore", "StoreError",
           "is_session_id", "open_store", "session_prefix"]


_SESSION_ID = re.compile(r"^(\d{4})(\d{2})(\d{2})-\d{6}-[0-9a-f]{8}$")


def session_prefix(session_id: str) -> str:
    """``20261125-081106-ab12cd34`` -> ``2026/11/25/20261125-081106-ab12cd34/``."""
    m = _SESSION_ID.match(session_id)
    if not m:
        raise ValueError(f"not a session id: {session_id!r} (expected YYYYMMDD-HHMMSS-xxxxxxxx)")
    return f"{m.group(1)}/{m.group(2)}/{m.group(3)}/{session_id}/"


def is_session_id(value: str) -> bool:
    return bool(_SESSION_ID.match(value))


class FileStore:
    """Recordings in a local folder. Not write-once: anyone with write access to the folder
    can change a file (the signatures still reveal it)."""

    write_once = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()

    def _path(self, key: str) -> Path:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid key {key!r}")
        return self.root / key

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            # link() fails if the key exists: the write-once check and the publish are one step.
            os.link(tmp, path)
        except FileExistsError:
            raise ObjectExists(f"{key} already exists") from None
        finally:
            os.unlink(tmp)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.url}") from None
        except OSError as exc:
            raise StoreError(f"cannot read {key}: {exc.strerror}") from None

    def head(self, key: str) -> ObjectInfo:
        try:
            return ObjectInfo(key, self._path(key).stat().st_size)
        except FileNotFoundError:
            raise ObjectNotFound(f"{key} not found in {self.url}") from None

    def list(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix if (not prefix or prefix.endswith("/")) else (self.root / prefix).parent
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames.sort()
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in sorted(filenames):
                if name.startswith("."):
                    continue
                key = name if rel == "." else f"{rel}/{name}"
                if key.startswith(prefix):
                    yield key

    def check(self) -> builtins.list[str]:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return [f"cannot create {self.root}: {exc.strerror}"]
        if not os.access(self.root, os.W_OK):
            return [f"{self.root} is not writable"]
        return []


def is_outage(problem: str) -> bool:
    """Whether a ``check()`` problem says the store does not answer (an outage the spool rides
    out), rather than that it answers and is unfit (no bucket, no Object Lock, access denied).
    The wording is S3Store._error's (connection refused or timed out)."""
    return problem.startswith("cannot reach ") or " did not answer within " in problem


def open_store(url: str, lock_mode: str = "COMPLIANCE", retention: float = 5 * 31536000.0) -> RecordingStore:
    """The store for a recordings URL. ``lock_mode`` and ``retention`` (seconds) apply to S3."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        from recorder.s3store import S3Store

        return S3Store.from_url(url, lock_mode=lock_mode, retention=retention)
    if not parsed.scheme and url:
        return FileStore(Path(url).resolve())
    raise StoreError(f"unsupported recordings URL {url!r}: use file:///PATH or s3://BUCKET/PREFIX")
