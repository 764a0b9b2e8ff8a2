"""Per-identity session limits: concurrent sessions and new sessions per minute, per subject.

Counted on this replica (what the replica can enforce without a round trip to the state
database on every connection): with N replicas behind a load balancer a subject may have
up to N times the limit. A session counts from the moment it is admitted (before the
target is contacted) until it ends, so a burst of connections cannot slip past the count
while their targets connect.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass

PENDING_TTL = 300.0  # an admitted session that never started (a path that forgot to release)


@dataclass(frozen=True)
class SessionLimits:
    """The limits of one session, from the access rule that allowed it (``rule``)."""

    on_expiry: str = "end"  # end | warn | allow
    max_session: float = 8 * 3600.0  # cap for warn / allow, from the session's start
    idle_timeout: float | None = None
    max_duration: float | None = None
    rule: str | None = None


class SessionLimiter:
    def __init__(self) -> None:
        self._active: dict[str, str] = {}  # session id -> subject
        self._pending_since: dict[str, float] = {}
        self._recent: dict[str, collections.deque[float]] = {}

    def count(self, subject: str) -> int:
        return sum(1 for s in self._active.values() if s == subject)

    def admit(self, key: str, subject: str, max_sessions: int, per_minute: int,
              now: float | None = None) -> str | None:
        """Take a slot for session ``key`` of ``subject``; a refusal message, or None."""
        now = time.monotonic() if now is None else now
        self._expire_pending(now)
        if max_sessions and self.count(subject) >= max_sessions:
            return (f"too many sessions for {subject}: {max_sessions} open at once is the limit on this gateway "
                    "(limits.max_sessions_per_subject); end some first")
        if per_minute:
            recent = self._recent.setdefault(subject, collections.deque())
            while recent and recent[0] <= now - 60:
                recent.popleft()
            if len(recent) >= per_minute:
                wait = int(60 - (now - recent[0])) + 1
                return (f"too many new sessions for {subject}: {per_minute} in the last minute is the limit on "
                        f"this gateway (limits.sessions_per_minute); try again in {wait}s")
            recent.append(now)
        self._active[key] = subject
        self._pending_since[key] = now
        return None

    def started(self, key: str, subject: str) -> None:
        """The admitted session exists now (or a session that was never admitted: counted too)."""
        self._active[key] = subject
        self._pending_since.pop(key, None)

    def release_pending(self, key: str) -> None:
        """An admitted session that will never start (refused, failed, client gone)."""
        if self._pending_since.pop(key, None) is not None:
            self._active.pop(key, None)

    def ended(self, key: str) -> None:
        self._active.pop(key, None)
        self._pending_since.pop(key, None)

    def _expire_pending(self, now: float) -> None:
        for key, since in list(self._pending_since.items()):
            if since < now - PENDING_TTL:
                self.release_pending(key)
        for subject, recent in list(self._recent.items()):
            if not recent or recent[-1] <= now - 60:
                del self._recent[subject]
