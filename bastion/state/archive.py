"""The archive index: sealed sessions, their commands and masked values' keyed hashes, in the
state database (SQLite or PostgreSQL), so that `replay ls --subject`, `replay search
--commands-only` and `replay masked` answer without reading every recording.

The bucket stays the truth: a row is written only after the session's manifest is in the
store, and the whole index can be rebuilt from the bucket (`replay index --rebuild`). What
goes in an entry is decided by replay/index.py; this module only stores and selects rows.

Command patterns are regular expressions, which SQL cannot run the same way everywhere:
the database narrows rows by a literal every match must contain (LIKE, a pg_trgm index
on PostgreSQL), and the caller applies the regular expression to what comes back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bastion.state import schema as s
from bastion.state.store import StateError, _sqlite_setup, engine_url

TABLES = (s.archive_sessions, s.archive_names, s.archive_commands, s.archive_masked)
# Rows per INSERT statement when loading many sessions at once.
BATCH_ROWS = 2000


@dataclass
class ArchiveEntry:
    """One sealed session as the index holds it."""

    id: str
    started: float
    state: str
    manifest: dict[str, Any]
    names: list[str] = field(default_factory=list)
    commands: list[tuple[float, str]] = field(default_factory=list)
    # t, stream, detector, offset, length, keyed hash
    masked: list[tuple[float, str, str, int, int, str]] = field(default_factory=list)


class ArchiveIndex:
    """Reads and writes the archive tables through an async SQLAlchemy engine."""

    def __init__(self, engine: AsyncEngine, kind: str) -> None:
        self.engine = engine
        self.kind = kind

    async def ensure_tables(self) -> None:
        """Create the archive tables (and on PostgreSQL a trigram index for command search,
        when the pg_trgm extension can be had) if they are missing."""
        async with self.engine.begin() as conn:
            if self.kind == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(4711081)"))
            await conn.run_sync(lambda sync: s.metadata.create_all(sync, tables=list(TABLES)))
        if self.kind == "postgresql":
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(text("CREATE EXTENSION IF NOT EXISTS pg_trgm"))
                    await conn.execute(text("CREATE INDEX IF NOT EXISTS archive_commands_trgm ON archive_commands "
                                            "USING gin (command gin_trgm_ops)"))
            except Exception:  # noqa: BLE001 - without the extension, searches scan the table
                pass

    async def put(self, entries: Sequence[ArchiveEntry]) -> None:
        """Insert or replace these sessions' rows (idempotent: a session indexed twice, live
        and by a rebuild, has one set of rows)."""
        if not entries:
            return
        ids = [e.id for e in entries]
        now = time.time()
        sessions = [{"id": e.id, "started": e.started, "state": e.state, "manifest": e.manifest, "indexed": now}
                    for e in entries]
        names = [{"session_id": e.id, "name": n} for e in entries for n in dict.fromkeys(e.names)]
        commands = [{"session_id": e.id, "seq": i, "t": t, "command": c}
                    for e in entries for i, (t, c) in enumerate(e.commands)]
        masked = [{"session_id": e.id, "seq": i, "t": m[0], "stream": m[1], "detector": m[2], "offset": m[3],
                   "length": m[4], "hmac": m[5]} for e in entries for i, m in enumerate(e.masked)]
        async with self.engine.begin() as conn:
            for table in TABLES:
                column = table.c.id if table is s.archive_sessions else table.c.session_id
                await conn.execute(delete(table).where(column.in_(ids)))
            for table, rows in ((s.archive_sessions, sessions), (s.archive_names, names),
                                (s.archive_commands, commands), (s.archive_masked, masked)):
                for start in range(0, len(rows), BATCH_ROWS):
                    await conn.execute(insert(table), rows[start:start + BATCH_ROWS])

    async def load_fresh(self, entries: Sequence[ArchiveEntry]) -> None:
        """Add sessions known not to be indexed yet, as fast as the database takes them: COPY on
        PostgreSQL (a bulk load: a large rebuild into an empty index, the scale bench),
        plain inserts elsewhere. A session already indexed makes it fail; use put() then."""
        if self.kind != "postgresql":
            await self.put(entries)
            return
        now = time.time()
        records = {
            "archive_sessions": ([(e.id, e.started, e.state, json.dumps(e.manifest, ensure_ascii=False), now)
                                  for e in entries], ["id", "started", "state", "manifest", "indexed"]),
            "archive_names": ([(e.id, n) for e in entries for n in dict.fromkeys(e.names)], ["session_id", "name"]),
            "archive_commands": ([(e.id, i, t, c) for e in entries for i, (t, c) in enumerate(e.commands)],
                                 ["session_id", "seq", "t", "command"]),
            "archive_masked": ([(e.id, i, m[5], m[0], m[1], m[2], m[3], m[4]) for e in entries
                                for i, m in enumerate(e.masked)],
                               ["session_id", "seq", "hmac", "t", "stream", "detector", "offset", "length"]),
        }
        async with self.engine.begin() as conn:
            raw = (await conn.get_raw_connection()).driver_connection
            assert raw is not None
            for table, (rows, columns) in records.items():
                if rows:
                    await raw.copy_records_to_table(table, records=rows, columns=columns)

    async def count(self) -> int:
        async with self.engine.connect() as conn:
            return int((await conn.execute(select(func.count()).select_from(s.archive_sessions))).scalar() or 0)

    async def sessions(self, *, ids: Iterable[str] | None = None, since: float | None = None,
                       until: float | None = None, name: str | None = None) -> list[dict[str, Any]]:
        """Session rows (id, started, state, manifest) in id order, narrowed by these filters."""
        t = s.archive_sessions
        query = select(t.c.id, t.c.started, t.c.state, t.c.manifest).order_by(t.c.id)
        if since is not None:
            query = query.where(t.c.started >= since)
        if until is not None:
            query = query.where(t.c.started <= until)
        if name is not None:
            query = query.where(t.c.id.in_(select(s.archive_names.c.session_id)
                                           .where(s.archive_names.c.name == name)))
        if ids is not None:
            wanted = sorted(set(ids))
            rows: list[dict[str, Any]] = []
            for start in range(0, len(wanted), 500):
                rows += await self._rows(query.where(t.c.id.in_(wanted[start:start + 500])))
            return sorted(rows, key=lambda r: r["id"])
        return await self._rows(query)

    async def commands(self, contains: str | None, ignore_case: bool) -> list[dict[str, Any]]:
        """Command rows (session_id, seq, t, command) whose text contains ``contains``
        (any, when None), in session and recording order."""
        t = s.archive_commands
        query = select(t.c.session_id, t.c.seq, t.c.t, t.c.command).order_by(t.c.session_id, t.c.seq)
        if contains:
            column = t.c.command
            if ignore_case:
                query = query.where(func.lower(column).contains(contains.lower(), autoescape=True))
            else:
                query = query.where(column.contains(contains, autoescape=True))
        return await self._rows(query)

    async def masked(self, hmac: str) -> list[dict[str, Any]]:
        t = s.archive_masked
        query = (select(t.c.session_id, t.c.seq, t.c.t, t.c.stream, t.c.detector, t.c.offset, t.c.length)
                 .where(t.c.hmac == hmac).order_by(t.c.session_id, t.c.seq))
        return await self._rows(query)

    async def _rows(self, query: Any) -> list[dict[str, Any]]:
        try:
            async with self.engine.connect() as conn:
                return [dict(r) for r in (await conn.execute(query)).mappings().all()]
        except Exception as exc:
            if "archive_" in str(exc) and ("no such table" in str(exc) or "does not exist" in str(exc)):
                raise StateError("the state database has no archive index yet: build it with "
                                 "`replay index --rebuild`") from None
            raise

    async def close(self) -> None:
        await self.engine.dispose()


def open_archive_index(url: str) -> ArchiveIndex:
    """An archive index on its own engine (for `replay`, which has no gateway state store)."""
    kind, sa_url = engine_url(url)
    if kind == "sqlite":
        from pathlib import Path

        from sqlalchemy.engine import make_url

        Path(str(make_url(sa_url).database)).parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(sa_url)
        _sqlite_setup(engine)
        return ArchiveIndex(engine, kind)
    return ArchiveIndex(create_async_engine(sa_url, pool_size=2, max_overflow=4), kind)
