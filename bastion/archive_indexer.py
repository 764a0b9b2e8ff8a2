"""Fills the archive index (bastion/state/archive.py) as sessions are stored.

The recorder calls :meth:`ArchiveIndexer.session_stored` once a session's manifest is in the
bucket; the entry is made the way `replay index --rebuild` makes it (replay/index.py), so
the live index and a rebuilt one hold the same rows. A failure to index is logged and
never touches the session or its recording: the bucket is the truth, and a rebuild adds
what is missing.
"""

from __future__ import annotations

import asyncio
import json
import logging

from bastion.state.archive import ArchiveIndex
from bastion.state.store import StateStore
from recorder.store import RecordingStore

log = logging.getLogger("guarita.archive")


class ArchiveIndexer:
    def __init__(self, state: StateStore, store: RecordingStore) -> None:
        self.state = state
        self.store = store
        self.index: ArchiveIndex | None = None
        self._ready = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self.indexed = 0
        self.failed = 0

    async def start(self) -> None:
        """Call once the state store is started: sessions stored before wait until then."""
        assert self.state.engine is not None
        self.index = ArchiveIndex(self.state.engine, self.state.kind)
        try:
            await self.index.ensure_tables()
        except Exception as exc:  # noqa: BLE001 - the gateway runs without an index; replay scans
            log.error("the archive index cannot be prepared in %s: %s; sessions are not indexed until "
                      "`replay index --rebuild`", self.state.display_url, exc)
            self.index = None
        self._ready.set()

    async def stop(self, timeout: float = 10.0) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout)

    def session_stored(self, session_id: str, manifest: bytes) -> None:
        task = asyncio.get_running_loop().create_task(self._index_one(session_id, manifest),
                                                      name=f"archive-index-{session_id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _index_one(self, session_id: str, manifest_bytes: bytes) -> None:
        from replay.index import entry_for
        from replay.reader import SessionSummary

        await self._ready.wait()
        if self.index is None:
            return
        try:
            manifest = json.loads(manifest_bytes)
            summary = SessionSummary(session_id, manifest["session"], manifest, [])
            entry = await asyncio.to_thread(entry_for, self.store, summary)
            await self.index.put([entry])
            self.indexed += 1
        except Exception as exc:  # noqa: BLE001 - indexing never harms the session
            self.failed += 1
            log.warning("session %s is stored but not indexed: %s; `replay index --rebuild` adds it",
                        session_id, exc)
