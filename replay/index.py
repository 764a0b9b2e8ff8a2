"""The archive index from replay's side: what an entry holds, rebuilding it from the bucket,
and answering ls / search --commands-only / masked from it with the scan's exact answers.

An entry is made from a sealed session's manifest: its metadata, the names `--subject`
matches, and its commands and masked values (from the manifest's ``index``, or, for a
recording made before the index or whose index overflowed, from its segments: the same
functions the scan uses, so both give the same answers).

Answers are re-checked in Python with the scan's own predicates (``Filters.match``, the
regular expression): the database only narrows what is read. Live sessions (no manifest
yet) are not in the index; `bastion sessions ls` shows them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import re._parser as sre_parse
from collections.abc import Callable
from typing import Any

from bastion.state.archive import ArchiveEntry, ArchiveIndex
from recorder.index import manifest_index
from recorder.segment import segment_name
from recorder.store import NotFound, RecordingStore, is_session_id, session_prefix
from replay.reader import ReplayError, SessionSummary, _date_prefixes
from replay.search import Hit, MaskHit, all_masked_in_session, search_session

_MATCH_ALL = re.compile("")
# Manifests read at once while rebuilding (reads wait on the store, not the CPU).
REBUILD_READERS = 16


def entry_for(store: RecordingStore, summary: SessionSummary) -> ArchiveEntry:
    """The index entry of a sealed session (reads its segments only for an old recording)."""
    assert summary.manifest is not None, "only sealed sessions are indexed"
    manifest = {k: v for k, v in summary.manifest.items() if k not in ("signature", "public_key", "index")}
    identity = summary.identity
    names = [str(n) for n in (identity.get("subject"), identity.get("email"), *summary.actors) if n]
    carried = manifest_index(summary.manifest)
    if carried is not None:
        commands, masked = carried
        command = summary.meta.get("command")
        # The exec command is in the metadata; the gateway's marker for it (its first
        # command) is the same command: index it once.
        if command and not (commands and commands[0][1] == str(command)):
            commands = [(0.0, str(command)), *commands]
    else:
        commands = [(h.t, h.text) for h in search_session(store, summary, _MATCH_ALL, commands_only=True)]
        masked = [(h.t, h.stream, h.detector, h.offset, h.length, hmac) for h, hmac in
                  all_masked_in_session(store, summary)]
    return ArchiveEntry(summary.id, summary.started_at.timestamp(), summary.state, manifest, names, commands, masked)


def summary_of(row: dict[str, Any]) -> SessionSummary:
    """A session summary from an index row, as the scan would have read it."""
    manifest = row["manifest"]
    prefix = session_prefix(row["id"])
    keys = [prefix + segment_name(int(seg["index"])) for seg in manifest.get("segments") or ()]
    return SessionSummary(row["id"], manifest["session"], manifest, keys)


async def rebuild(store: RecordingStore, index: ArchiveIndex, since: Any = None,
                  on_progress: Callable[[int], None] | None = None, batch: int = 200,
                  on_skip: Callable[[str, str], None] | None = None) -> int:
    """Index every sealed session in the store (from `since` on); returns how many.
    Manifests are read REBUILD_READERS at a time (a bucket of millions is mostly waiting)."""
    await index.ensure_tables()
    loop = asyncio.get_running_loop()
    done = 0
    with concurrent.futures.ThreadPoolExecutor(REBUILD_READERS, thread_name_prefix="index-rebuild") as pool:
        sealed = await loop.run_in_executor(pool, _sealed_sessions, store, since)
        for start in range(0, len(sealed), batch):
            chunk = sealed[start:start + batch]
            entries = await asyncio.gather(*(loop.run_in_executor(pool, _entry_of, store, sid) for sid in chunk))
            for sid, entry in zip(chunk, entries, strict=True):
                if isinstance(entry, str) and on_skip:
                    on_skip(sid, entry)
            good = [e for e in entries if isinstance(e, ArchiveEntry)]
            await index.put(good)
            done += len(good)
            if on_progress:
                on_progress(done)
    return done


def _sealed_sessions(store: RecordingStore, since: Any) -> list[str]:
    """Ids of sessions whose manifest is in the store, from one listing (no reads)."""
    ids = []
    for prefix in _date_prefixes(since):
        for key in store.list(prefix):
            parts = key.split("/")
            if len(parts) == 5 and parts[4] == "manifest.json" and is_session_id(parts[3]):
                ids.append(parts[3])
    return sorted(ids)


def _entry_of(store: RecordingStore, sid: str) -> ArchiveEntry | str:
    """The session's entry, or why it cannot be indexed (`replay verify` says more)."""
    try:
        manifest = json.loads(store.get(session_prefix(sid) + "manifest.json"))
        summary = SessionSummary(sid, manifest["session"], manifest, [])
        return entry_for(store, summary)
    except ReplayError as exc:
        return str(exc)
    except (NotFound, ValueError, KeyError, TypeError) as exc:
        return f"manifest.json is not readable ({exc})"


async def indexed_sessions(index: ArchiveIndex, match: Callable[[SessionSummary], bool], *,
                           since: float | None = None, until: float | None = None,
                           subject: str | None = None, ids: list[str] | None = None) -> list[SessionSummary]:
    rows = await index.sessions(ids=ids, since=since, until=until, name=subject)
    return [summary for summary in map(summary_of, rows) if match(summary)]


async def command_hits(index: ArchiveIndex, match: Callable[[SessionSummary], bool], pattern: re.Pattern[str],
                       **narrow: Any) -> list[Hit]:
    """``search --commands-only`` from the index: the same hits, in the same order."""
    literal, ignore_case = required_literal(pattern)
    rows = await index.commands(literal, ignore_case)
    by_session: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if pattern.search(row["command"]):
            by_session.setdefault(row["session_id"], []).append(row)
    sessions = await indexed_sessions(index, match, ids=list(by_session), **narrow)
    return [Hit(s.id, row["t"], "command", row["command"]) for s in sessions for row in by_session[s.id]]


async def mask_hits(index: ArchiveIndex, match: Callable[[SessionSummary], bool], hmac: str,
                    **narrow: Any) -> list[MaskHit]:
    rows = await index.masked(hmac)
    by_session: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_session.setdefault(row["session_id"], []).append(row)
    sessions = await indexed_sessions(index, match, ids=list(by_session), **narrow)
    return [MaskHit(s.id, row["t"], row["stream"], row["detector"], int(row["offset"]), int(row["length"]))
            for s in sessions for row in by_session[s.id]]


# Letters that Python's case-insensitive matching folds with non-ASCII characters SQL's
# lower() may leave alone (the Kelvin sign, the long s, the dotted and dotless i): no
# case-insensitive prefilter on them.
_ODD_FOLDS = set("iIkKsS")


def required_literal(pattern: re.Pattern[str]) -> tuple[str | None, bool]:
    """The longest run of literal characters every match of ``pattern`` contains (None when
    there is none worth asking the database for), and whether it is case-insensitive."""
    try:
        parsed = sre_parse.parse(pattern.pattern, pattern.flags)
    except re.error:
        return None, False
    ignore_case = bool(parsed.state.flags & re.IGNORECASE)
    best, run = "", ""
    for op, value in list(parsed) + [(None, None)]:
        if op is sre_parse.LITERAL and not (ignore_case and (value > 127 or chr(value) in _ODD_FOLDS)):
            run += chr(value)
            continue
        best, run = max(best, run, key=len), ""
    return (best or None), ignore_case

