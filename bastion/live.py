"""The one registry of this replica's live sessions, and their rows in the state database.

Every live session is here from the moment the pipeline opens it until it ends, with the
front door's :class:`ClientSide` (how the gateway ends it or talks to its user). Locks,
kills, session limits, ``bastion sessions ls`` / ``GET /v1/sessions``, graceful shutdown
and metrics all read this one registry.

The state database holds a row per live session (any replica's ``sessions ls``). The row
of a session is written by one chain of tasks per session, in order: a session that ends
before its row was added still gets its row added *then* removed, never removed first and
added after (which left ended sessions listed for ever, and ``sessions kill`` answering
"is being ended" for them).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Iterator
from typing import Any, Protocol

log = logging.getLogger("guarita.live")


class Terminable(Protocol):
    """What the registry needs of a front door's side of a session (bastion.pipeline.ClientSide)."""

    def terminate(self, message: str) -> None: ...

    def notify_user(self, text: str) -> None: ...


class LiveRows(Protocol):
    """The state database's live-session rows (bastion.state.store.StateStore)."""

    async def add_live_session(self, values: dict[str, Any]) -> None: ...

    async def remove_live_session(self, session_id: str) -> None: ...

    async def update_live_sessions(self, counts: list[tuple[str, int, int]]) -> None: ...

    async def remove_stale_live_sessions(self, keep: Collection[str], before: float) -> int: ...


class LiveSessions:
    """Live sessions (and held Kubernetes streams) of this replica, by id."""

    def __init__(self, rows: Callable[[], LiveRows]) -> None:
        self._rows = rows  # a getter: the state store is opened after the registry exists
        self.sessions: dict[str, Any] = {}  # session id -> bastion.session.Session
        self.clients: dict[str, Terminable] = {}  # session id -> its front door's side
        self.held: dict[str, Any] = {}  # stream id -> bastion.doors.kube.held.HeldStream
        self._row_tasks: dict[str, asyncio.Task[None]] = {}
        self._closed = asyncio.Event()

    # -- sessions ----------------------------------------------------------------------------

    def opened(self, session: Any, client: Terminable, row: dict[str, Any]) -> None:
        """A session the pipeline opened: listed here and (in order) in the state database."""
        self.sessions[session.id] = session
        self.clients[session.id] = client
        self._closed.clear()
        self._chain(session.id, lambda: self._rows().add_live_session(row), "recording the live session")

    def ended(self, session_id: str) -> None:
        """The session ended (idempotent): gone from here, and its row removed after it was added."""
        self.clients.pop(session_id, None)
        if self.sessions.pop(session_id, None) is None:
            return
        self._chain(session_id, lambda: self._rows().remove_live_session(session_id), "removing the live session")
        if not self.sessions:
            self._closed.set()

    def client(self, session_id: str) -> Terminable | None:
        return self.clients.get(session_id)

    def __len__(self) -> int:
        return len(self.sessions)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self.sessions.values()))

    def terminate_all(self, message: str) -> None:
        for sid, client in list(self.clients.items()):
            if sid in self.sessions:
                client.terminate(message)

    async def wait_empty(self, timeout: float) -> bool:
        """Wait until no session is live (True), at most ``timeout`` seconds."""
        if not self.sessions:
            return True
        self._closed.clear()
        try:
            async with asyncio.timeout(timeout):
                while self.sessions:
                    await self._closed.wait()
                    self._closed.clear()
        except TimeoutError:
            return False
        return True

    # -- Kubernetes streams held like sessions (port-forward, watch, logs -f) -------------------

    def held_started(self, stream: Any) -> None:
        self.held[stream.id] = stream

    def held_ended(self, stream: Any) -> None:
        self.held.pop(stream.id, None)

    def all(self) -> list[Any]:
        """Sessions and held streams: everything a lock or kill may have to end."""
        return [*self.sessions.values(), *self.held.values()]

    # -- the state database's rows ----------------------------------------------------------

    async def update_counts(self) -> None:
        """Every few seconds (the approvals sweep): byte counts into the rows, and the rows made
        true again: one whose removal failed is removed now, so the list cannot keep an ended
        session for longer than one sweep after the database answers again."""
        before = time.time()  # rows added from here on are not judged stale in this pass
        keep = set(self.sessions) | set(self._row_tasks)  # live, or a write still on its way
        counts = [(sid, s.recording.counts.get("i", 0), s.recording.counts.get("o", 0) + s.recording.counts.get("e", 0))
                  for sid, s in list(self.sessions.items())]
        await self._rows().update_live_sessions(counts)
        if removed := await self._rows().remove_stale_live_sessions(keep, before):
            log.warning("removed %d live-session rows of ended sessions (their removal had failed)", removed)

    async def settle(self, timeout: float = 5.0) -> None:
        """Wait for the rows being written (before the state database closes)."""
        tasks = list(self._row_tasks.values())
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)

    def _chain(self, session_id: str, op: Callable[[], Awaitable[None]], what: str) -> None:
        before = self._row_tasks.get(session_id)

        async def run() -> None:
            if before is not None:
                await asyncio.gather(before, return_exceptions=True)
            try:
                await op()
            except Exception as exc:  # the database may be briefly away: the sweep of dead replicas cleans up
                log.warning("%s %s failed: %s", what, session_id, exc)

        task = asyncio.get_running_loop().create_task(run())
        self._row_tasks[session_id] = task

        def done(t: asyncio.Task[None]) -> None:
            if self._row_tasks.get(session_id) is t:
                del self._row_tasks[session_id]

        task.add_done_callback(done)
