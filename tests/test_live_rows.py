"""The live-session rows stay true when the database misses a removal: the sweep's
``LiveSessions.update_counts`` takes off this replica's rows of sessions that ended, and
never the row of a session opened meanwhile. A real state store (SQLite)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from bastion.live import LiveSessions
from bastion.state.store import StateStore


def _row(sid: str) -> dict[str, Any]:
    return {"id": sid, "identity": {"subject": "alice"}, "subject": "alice", "front_door": "ssh", "target": "web"}


class _Client:
    def terminate(self, message: str) -> None:
        pass

    def notify_user(self, text: str) -> None:
        pass


def _session(sid: str) -> Any:
    return SimpleNamespace(id=sid, recording=SimpleNamespace(counts={"i": 1, "o": 2}))


class _FailingRemoval:
    """The state store, except that removing a row fails (the database was away)."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)

    async def remove_live_session(self, session_id: str) -> None:
        raise OSError("database is away")


def test_a_failed_removal_is_made_good_by_the_next_sweep(tmp_path: Path) -> None:
    async def run() -> None:
        store = StateStore(f"sqlite:///{tmp_path / 'state.db'}")
        await store.start()
        try:
            rows: Any = _FailingRemoval(store)
            live = LiveSessions(lambda: rows)
            live.opened(_session("ended"), _Client(), _row("ended"))
            live.opened(_session("running"), _Client(), _row("running"))
            await live.settle()
            live.ended("ended")
            await live.settle()  # the removal failed: the row is still listed
            assert {r["id"] for r in await store.list_live_sessions()} == {"ended", "running"}

            # A session that opens while the sweep runs (its row not written yet) is kept.
            live.opened(_session("opening"), _Client(), _row("opening"))
            await live.update_counts()
            await live.settle()
            listed = {r["id"]: r for r in await store.list_live_sessions()}
            assert set(listed) == {"running", "opening"}
            assert listed["running"]["bytes_out"] == 2
        finally:
            await store.close()

    asyncio.run(run())


def test_another_replicas_rows_are_never_touched(tmp_path: Path) -> None:
    async def run() -> None:
        url = f"sqlite:///{tmp_path / 'state.db'}"
        mine, other = StateStore(url), StateStore(url)
        await mine.start()
        await other.start()
        try:
            await other.add_live_session(_row("elsewhere"))
            live = LiveSessions(lambda: mine)
            await live.update_counts()
            assert [r["id"] for r in await mine.list_live_sessions()] == ["elsewhere"]
        finally:
            await other.close()
            await mine.close()

    asyncio.run(run())
