"""Throttling of credential guessing on the SSH front door.

Three limits, each refused with one clear line to the client and an ``auth.throttled``
audit event (counted in ``guarita_auth_throttled_total{scope}``):

* ``connection``: at most :data:`MAX_AUTH_TRIES` failed attempts per SSH connection
  (OpenSSH's MaxAuthTries default), then the connection is closed;
* ``address``: at most :data:`PER_ADDRESS` failed logins per source address in
  :data:`WINDOW` seconds; past it, attempts from that address are refused before any token
  is parsed or verified (a burst of bad tokens costs a dictionary lookup each);
* ``subject``: at most :data:`PER_SUBJECT` failed logins naming one subject (the token's
  ``sub`` claim, read without trusting it) in the window, from anywhere; past it, tokens
  naming that subject are refused until the window moves on. A valid token for that subject
  is refused too for at most :data:`WINDOW` seconds: the price of stopping a distributed
  guess at one identity.

Counters live in memory, per replica: a load balancer spreading one attacker over N
replicas gives them N times the budget, still bounded.
"""

from __future__ import annotations

import base64
import collections
import json
import time
from collections.abc import Callable
from typing import Literal

MAX_AUTH_TRIES = 6
PER_ADDRESS = 60
PER_SUBJECT = 30
WINDOW = 60.0
# Keys kept at most (addresses + subjects): past it the stalest are forgotten.
MAX_KEYS = 100_000

Scope = Literal["connection", "address", "subject"]


class AuthThrottle:
    """Sliding windows of failure times per source address and per subject."""

    def __init__(self, per_address: int = PER_ADDRESS, per_subject: int = PER_SUBJECT, window: float = WINDOW,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.per_address = per_address
        self.per_subject = per_subject
        self.window = window
        self.clock = clock
        self._failures: collections.OrderedDict[str, collections.deque[float]] = collections.OrderedDict()

    def refusal(self, address: str, subject: str | None) -> tuple[Scope, str] | None:
        """Whether a new attempt from ``address`` naming ``subject`` is refused, and why (one line)."""
        wait = self._wait("a:" + address, self.per_address)
        if wait:
            return "address", (f"too many failed logins from {address}: try again in {wait}s")
        if subject is not None:
            wait = self._wait("s:" + subject, self.per_subject)
            if wait:
                return "subject", f"too many failed logins for {subject}: try again in {wait}s"
        return None

    def failed(self, address: str, subject: str | None) -> None:
        now = self.clock()
        self._note("a:" + address, now)
        if subject is not None:
            self._note("s:" + subject, now)

    def _note(self, key: str, now: float) -> None:
        times = self._failures.pop(key, None) or collections.deque()
        times.append(now)
        limit = max(self.per_address, self.per_subject) + 1
        while len(times) > limit:
            times.popleft()
        self._failures[key] = times  # most recent last
        while len(self._failures) > MAX_KEYS:
            self._failures.popitem(last=False)

    def _wait(self, key: str, limit: int) -> int:
        """Seconds until ``key`` is under its limit again (0: it is)."""
        times = self._failures.get(key)
        if not times:
            return 0
        now = self.clock()
        while times and now - times[0] >= self.window:
            times.popleft()
        if len(times) < limit:
            return 0
        return max(1, int(times[-limit] + self.window - now + 0.999))


def claimed_subject(token: str) -> str | None:
    """The ``sub`` claim of a JWT, unverified (for counting failures only), or None."""
    parts = token.strip().split(".")
    if len(parts) != 3 or len(parts[1]) > 16384:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (ValueError, TypeError):
        return None
    sub = payload.get("sub") if isinstance(payload, dict) else None
    return sub[:256] if isinstance(sub, str) and sub else None
