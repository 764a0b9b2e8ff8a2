"""What changed, for open console pages (server-sent events).

One task per gateway reads the state database twice a second while at least one page
listens, and tells the pages when the approval requests or the live sessions changed.
Reading the shared database (not this replica's memory) is what makes a request decided on
another replica, or a session started there, show up on a page served by this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator
from typing import Any

log = logging.getLogger("guarita.console")

TOPICS = ("approvals", "sessions")


class Feed:
    def __init__(self, state: Any, interval: float = 0.5) -> None:
        self.state = state
        self.interval = interval
        self.versions = dict.fromkeys(TOPICS, 0)
        self._digests: dict[str, str] = {}
        self._listeners: set[asyncio.Queue[str]] = set()
        self._task: asyncio.Task[None] | None = None

    @contextlib.asynccontextmanager
    async def listen(self) -> AsyncIterator[asyncio.Queue[str]]:
        queue: asyncio.Queue[str] = asyncio.Queue(maxsize=16)
        self._listeners.add(queue)
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="console-feed")
        try:
            yield queue
        finally:
            self._listeners.discard(queue)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while self._listeners:
            try:
                await self._poll()
            except Exception as exc:  # the database may be briefly away: pages keep what they show
                log.warning("console: cannot read the state database: %s", exc)
            await asyncio.sleep(self.interval)

    async def _poll(self) -> None:
        requests = await self.state.list_requests(status="pending", limit=1000) + \
            await self.state.list_requests(limit=200)
        sessions = await self.state.live_sessions_overview()
        digests = {
            "approvals": _digest((r["id"], r["status"], len(r.get("decisions") or [])) for r in requests),
            "sessions": _digest((s["id"], s.get("pending_approvals", 0)) for s in sessions),
        }
        for topic, digest in digests.items():
            if self._digests.get(topic) not in (None, digest):
                self.versions[topic] += 1
                for queue in list(self._listeners):
                    with contextlib.suppress(asyncio.QueueFull):  # a stuck page reloads on its next event
                        queue.put_nowait(topic)
            self._digests[topic] = digest


def _digest(items: Any) -> str:
    return hashlib.sha256(repr(sorted(items)).encode()).hexdigest()
