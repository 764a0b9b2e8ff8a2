"""Reading recordings back from a store, one segment at a time.

Everything here works from the store alone: the manifest (or, for a session still
running or never sealed, ``start.json``) carries the session's metadata.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from recorder.events import Event
from recorder.segment import SegmentError, parse_segment, segment_name
from recorder.store import NotFound, RecordingStore, is_session_id, session_prefix
from recorder.versions import get_version, hidden_objects


class ReplayError(Exception):
    """A clear, one-line reason why a recording cannot be read."""


@dataclass
class SessionSummary:
    id: str
    meta: dict[str, Any]
    manifest: dict[str, Any] | None
    segment_keys: list[str] = field(default_factory=list)
    # Objects of this session an S3 delete marker hides (start.json, manifest.json, segments):
    # the session was "deleted" around its Object Lock; it is listed, and it fails verify.
    deleted: list[str] = field(default_factory=list)
    # Why the session's metadata cannot be read (segments without start.json/manifest.json).
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.manifest is not None

    @property
    def started_at(self) -> datetime:
        return datetime.fromisoformat(self.meta["started_at"].replace("Z", "+00:00"))

    @property
    def end(self) -> dict[str, Any]:
        return (self.manifest or {}).get("end") or {}

    @property
    def identity(self) -> dict[str, Any]:
        return self.meta.get("identity") or {}

    @property
    def actors(self) -> list[str]:
        """The delegation chain (RFC 8693 ``act``), current actor first; empty for a direct token."""
        return [str(a.get("sub")) for a in self.identity.get("act") or () if isinstance(a, dict)]

    @property
    def who(self) -> str:
        """The subject, and who acted for it in the order delegation happened: ``alice via agent``."""
        return " via ".join([str(self.identity.get("subject", "?")), *reversed(self.actors)])

    @property
    def exit_status(self) -> int | None:
        return (self.end.get("exit") or {}).get("status")

    @property
    def state(self) -> str:
        if self.deleted:
            return "DELETED"
        if self.problem:
            return "DAMAGED"
        if not self.manifest:
            return "live"
        return "recovered" if self.end.get("recovered") else "complete"

    def to_dict(self) -> dict[str, Any]:
        out = {"id": self.id, "state": self.state, **{k: v for k, v in self.meta.items() if k not in ("format", "id")},
               "end": self.end or None, "segments": len(self.segment_keys)}
        if self.deleted:
            out["deleted"] = self.deleted
        if self.problem:
            out["problem"] = self.problem
        return out


def _date_prefixes(since: datetime | None) -> list[str]:
    if since is None:
        return [""]
    # Keys start with YYYY/MM/DD/: list only the days from `since` on.
    days: list[str] = []
    day, today = since.date(), datetime.now(UTC).date()
    while day <= today and len(days) < 400:
        days.append(day.strftime("%Y/%m/%d/"))
        day = day.fromordinal(day.toordinal() + 1)
    return days if len(days) < 400 else [""]


def list_sessions(store: RecordingStore, since: datetime | None = None) -> Iterator[SessionSummary]:
    """Every session in the store (newest last), read from manifests or start metadata."""
    groups: dict[str, dict[str, Any]] = {}
    for prefix in _date_prefixes(since):
        for key in store.list(prefix):
            parts = key.split("/")
            if len(parts) != 5 or not is_session_id(parts[3]):
                continue
            entry = groups.setdefault(parts[3], {"segments": []})
            if parts[4].startswith("seg-"):
                entry["segments"].append(key)
            else:
                entry[parts[4]] = key
        for key, version in hidden_objects(store, prefix).items():
            parts = key.split("/")
            if len(parts) == 5 and is_session_id(parts[3]):
                groups.setdefault(parts[3], {"segments": []}).setdefault("hidden", {})[parts[4]] = version
    for sid in sorted(groups):
        summary = _summary(store, sid, groups[sid])
        if summary is not None:
            yield summary


def _summary(store: RecordingStore, sid: str, entry: dict[str, Any]) -> SessionSummary | None:
    """The session from its manifest, else its start.json, else (hidden by a delete marker) their
    older versions. None for a directory being written right now (start.json not there yet)."""
    hidden: dict[str, str] = entry.get("hidden") or {}
    problem = None
    manifest = meta = None
    try:
        manifest = _json(store, sid, entry, hidden, "manifest.json")
        meta = manifest["session"] if manifest is not None else _json(store, sid, entry, hidden, "start.json")
    except (NotFound, ValueError, KeyError, TypeError) as exc:
        problem = f"its metadata cannot be read ({exc})"
    if meta is None and problem is None:
        if not hidden and not entry["segments"]:
            return None
        # start.json is uploaded before any segment: segments without it were tampered with.
        problem = "segments without start.json or manifest.json (its metadata was removed)"
    if not isinstance(meta, dict) or "started_at" not in meta:
        stamp = datetime.strptime(sid[:15], "%Y%m%d-%H%M%S").replace(tzinfo=UTC)
        meta = {"id": sid, "started_at": stamp.isoformat().replace("+00:00", "Z")}
    return SessionSummary(sid, meta, manifest, sorted(entry["segments"]), deleted=sorted(hidden), problem=problem)


def _json(store: RecordingStore, sid: str, entry: dict[str, Any], hidden: dict[str, str], name: str) -> Any:
    if name in entry:
        return json.loads(store.get(entry[name]))
    if name in hidden:
        return json.loads(get_version(store, session_prefix(sid) + name, hidden[name]))
    return None


def open_session(store: RecordingStore, ref: str) -> SessionSummary:
    """A session by full id, or by a unique part of it (e.g. the last 8 hex digits)."""
    if is_session_id(ref):
        prefix = session_prefix(ref)
        keys = list(store.list(prefix))
        hidden = {k[len(prefix):]: v for k, v in hidden_objects(store, prefix).items()}
        if not keys and not hidden:
            raise ReplayError(f"no recording {ref} in {store.url}")
        entry: dict[str, Any] = {"segments": [], "hidden": hidden}
        for key in keys:
            name = key[len(prefix):]
            if name.startswith("seg-"):
                entry["segments"].append(key)
            else:
                entry[name] = key
        summary = _summary(store, ref, entry)
        if summary is None:
            raise ReplayError(f"no recording {ref} in {store.url}")
        return summary
    matches = [s for s in list_sessions(store) if ref in s.id]
    if not matches:
        raise ReplayError(f"no recording matches {ref!r} in {store.url} (see `replay ls`)")
    if len(matches) > 1:
        raise ReplayError(f"{ref!r} matches {len(matches)} recordings: " + ", ".join(s.id for s in matches[:5]))
    return matches[0]


def segment_keys(summary: SessionSummary) -> list[str]:
    """Keys of the segments to read, in order: the manifest's list, or what is there so far."""
    if summary.manifest is not None:
        prefix = session_prefix(summary.id)
        return [prefix + segment_name(int(s["index"])) for s in summary.manifest["segments"]]
    return summary.segment_keys


def iter_events(store: RecordingStore, summary: SessionSummary, readers: int = 1) -> Iterator[Event]:
    """All events in order, holding one segment in memory at a time (``readers`` > 1: that
    many segments are fetched ahead in parallel threads, still yielded in order)."""
    for _, events in iter_segments(store, summary, readers):
        yield from events


def iter_segments(store: RecordingStore, summary: SessionSummary, readers: int = 1,
                  indices: list[int] | None = None) -> Iterator[tuple[int, list[Event]]]:
    """(position, events) of each segment in order, or of the positions in ``indices`` only
    (ascending: the others are never fetched); ``readers`` as for :func:`iter_events`."""
    keys = segment_keys(summary)
    wanted = list(range(len(keys))) if indices is None else [i for i in indices if 0 <= i < len(keys)]
    if readers <= 1 or len(wanted) <= 1:
        for i in wanted:
            yield i, _segment_events(keys[i], _get_segment(store, keys[i]))
        return
    with concurrent.futures.ThreadPoolExecutor(readers, thread_name_prefix="replay-read") as pool:
        ahead: collections.deque[tuple[int, concurrent.futures.Future[bytes]]] = collections.deque()
        pending = iter(wanted)
        for i in itertools.islice(pending, readers):
            ahead.append((i, pool.submit(_get_segment, store, keys[i])))
        try:
            while ahead:
                i, future = ahead.popleft()
                data = future.result()
                for nxt in itertools.islice(pending, 1):
                    ahead.append((nxt, pool.submit(_get_segment, store, keys[nxt])))
                yield i, _segment_events(keys[i], data)
        finally:
            for _, future in ahead:
                future.cancel()


def _get_segment(store: RecordingStore, key: str) -> bytes:
    try:
        return store.get(key)
    except NotFound:
        raise ReplayError(f"segment {key} is missing from {store.url}") from None


def _segment_events(key: str, data: bytes) -> list[Event]:
    try:
        return parse_segment(data, key)[1]
    except SegmentError as exc:
        raise ReplayError(str(exc)) from None
