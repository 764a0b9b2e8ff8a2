"""Segments: one object per few seconds of a session, a zstd stream of JSON lines.

The first line is the header (session, index, time, the SHA-256 of the previous
segment object, and a screen snapshot for terminal sessions); every other line is an
event. The spool appends one zstd frame per flush and fsyncs it, so a crash loses at
most one flush interval and never corrupts earlier frames; the sealed object is that
sequence of frames, which any zstd decoder reads as one stream (``zstd -dc``).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zstandard

from recorder.events import Event, decode_lines

FORMAT = "guarita-segment/1"
# Level 1: terminal text full of ids (commit hashes, UUIDs, request ids) compresses as well
# as at level 3 (0.270 vs 0.277 of its size) for 2.4 instead of 3.8 CPU s/GB, and a build
# log costs 0.128 instead of 0.121 for 1.4 instead of 1.6 (docs/benchmarks.md).
COMPRESSION_LEVEL = 1


class SegmentError(Exception):
    """A segment object cannot be read: ``str()`` says where and why."""


@dataclass(frozen=True)
class SegmentRecord:
    """What the manifest (and the spool's chain file) keep about a sealed segment."""

    index: int
    sha256: str
    size: int
    raw_size: int
    t_start: float
    t_end: float
    events: int
    # The header carries a screen snapshot: a player may start drawing here.
    snapshot: bool = False
    # What search needs to know to skip the segment (recorder/summary.py); None: never skipped.
    summary: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "summary" or v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SegmentRecord:
        return cls(int(d["index"]), str(d["sha256"]), int(d["size"]), int(d["raw_size"]),
                   float(d["t_start"]), float(d["t_end"]), int(d["events"]), bool(d.get("snapshot")),
                   d.get("summary") if isinstance(d.get("summary"), dict) else None)


def segment_name(index: int) -> str:
    return f"seg-{index:06d}.zst"


def make_header(session_id: str, index: int, prev_sha256: str | None, t: float,
                snapshot: dict[str, Any] | None) -> bytes:
    header = {"format": FORMAT, "session": session_id, "index": index, "prev_sha256": prev_sha256,
              "t": round(t, 6), "snapshot": snapshot}
    return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


class SegmentWriter:
    """Appends compressed frames to ``path`` (a spool file), hashing as it goes. Blocking I/O:
    run it off the event loop."""

    # Written since the last fsync (a class default: a writer resumed after a crash syncs).
    _dirty = True

    def __init__(self, path: Path, index: int, header: bytes, t_start: float, snapshot: bool = False) -> None:
        self.snapshot = snapshot
        self.path = path
        self.index = index
        self.t_start = t_start
        self.t_end = t_start
        self.raw_size = 0
        self.size = 0
        self.events = 0
        self._dirty = False  # written since the last fsync
        self._hash = hashlib.sha256()
        self._cctx = zstandard.ZstdCompressor(level=COMPRESSION_LEVEL)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        # No fsync here: the next flush (within flush_interval) syncs header and events together.
        self.append(header, events=0, t_end=t_start, sync=False)

    def append(self, raw: bytes, events: int, t_end: float, sync: bool) -> None:
        if raw:
            frame = self._cctx.compress(raw)
            _write_all(self._fd, frame)
            self._hash.update(frame)
            self.size += len(frame)
            self.raw_size += len(raw)
            self.events += events
            self.t_end = max(self.t_end, t_end)
            self._dirty = True
        if sync and self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def seal(self, sealed_path: Path) -> SegmentRecord:
        os.fsync(self._fd)
        os.close(self._fd)
        os.rename(self.path, sealed_path)
        _fsync_dir(sealed_path.parent)
        return SegmentRecord(self.index, self._hash.hexdigest(), self.size, self.raw_size,
                             round(self.t_start, 6), round(self.t_end, 6), self.events, self.snapshot)

    def abandon(self) -> None:
        try:
            os.close(self._fd)
        except OSError:
            pass


def read_frames(data: bytes) -> tuple[bytes, int, bool]:
    """Decompress consecutive frames; return (raw bytes, bytes of complete frames, damaged?)."""
    dctx = zstandard.ZstdDecompressor()
    out: list[bytes] = []
    offset = 0
    while offset < len(data):
        dobj = dctx.decompressobj()
        try:
            chunk = dobj.decompress(data[offset:])
        except zstandard.ZstdError:
            return b"".join(out), offset, True
        if not dobj.eof:
            return b"".join(out), offset, True
        out.append(chunk)
        offset = len(data) - len(dobj.unused_data)
    return b"".join(out), offset, False


def parse_segment(data: bytes, where: str = "segment") -> tuple[dict[str, Any], list[Event]]:
    """Header and events of a segment object; raises SegmentError naming what is broken."""
    raw, _, damaged = read_frames(data)
    if damaged:
        raise SegmentError(f"{where}: compressed data is truncated or corrupt")
    header_line, _, rest = raw.partition(b"\n")
    try:
        header = json.loads(header_line)
        if header.get("format") != FORMAT:
            raise ValueError(f"unknown format {header.get('format')!r}")
        events = list(decode_lines(rest))
    except (ValueError, TypeError) as exc:
        raise SegmentError(f"{where}: not a guarita segment ({exc})") from None
    return header, events


def iter_events(data: bytes) -> Iterator[Event]:
    yield from parse_segment(data)[1]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
