"""Locks: refuse new sessions that match, and end the live ones.

A lock names one thing: a ``subject`` (the identity's subject or e-mail), a ``group``, a
``target`` (an SSH target or a Kubernetes cluster, by name) or a ``claim`` (``name=value``,
one of the claims the issuer's ``extra_claims`` selects). Values match exactly: a lock is
an emergency brake, and a glob that matches more than meant is worse than none. A kill
is a lock of kind ``session`` on one session id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from bastion.identity import Identity

LOCK_KINDS = ("subject", "group", "target", "claim")


class LockError(ValueError):
    """A lock request that makes no sense; the message says why."""


def parse_lock_target(kind: str, value: str) -> tuple[str, str]:
    value = (value or "").strip()
    if kind not in (*LOCK_KINDS, "session"):
        raise LockError(f"a lock is on one of {', '.join(LOCK_KINDS)}, not {kind!r}")
    if not value:
        raise LockError(f"the {kind} to lock is empty")
    if len(value) > 512:
        raise LockError(f"the {kind} to lock is longer than 512 characters")
    if kind == "claim":
        name, sep, claim_value = value.partition("=")
        if not sep or not name.strip() or not claim_value.strip():
            raise LockError(f"a claim lock is NAME=VALUE (e.g. repository=org/app), not {value!r}")
        value = f"{name.strip()}={claim_value.strip()}"
    return kind, value


@dataclass(frozen=True)
class Lock:
    id: str
    kind: str
    value: str
    reason: str
    created_by: dict[str, Any]
    created: float
    until: float | None = None
    removed: float | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> Lock:
        return cls(id=row["id"], kind=row["kind"], value=row["value"], reason=row["reason"],
                   created_by=dict(row.get("created_by") or {}), created=float(row["created"]),
                   until=row.get("until"), removed=row.get("removed"))

    def active(self, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        return self.removed is None and (self.until is None or self.until > now)

    def matches(self, identity: Identity, target: str | None, session_id: str | None = None) -> bool:
        if self.kind == "session":
            return session_id is not None and session_id == self.value
        if self.kind == "subject":  # the subject, or anyone in its delegation chain
            return self.value in (identity.subject, identity.email) or any(
                self.value in (a.subject, a.client_id) for a in identity.actors)
        if self.kind == "group":
            return self.value in identity.groups
        if self.kind == "target":
            return target is not None and target == self.value
        if self.kind == "claim":
            name, _, value = self.value.partition("=")
            return identity.claims.get(name) == value
        return False

    def matches_row(self, row: dict[str, Any]) -> bool:
        """Against a ``live_sessions`` row (any replica's session)."""
        try:
            identity = Identity.from_dict(row["identity"])
        except (KeyError, TypeError, ValueError):
            return False
        return self.matches(identity, row.get("target"), row.get("id"))

    @property
    def what(self) -> str:
        if self.kind == "subject":
            return f"access for subject {self.value}"
        if self.kind == "group":
            return f"access for group {self.value}"
        if self.kind == "target":
            return f"target {self.value}"
        if self.kind == "claim":
            return f"access for {self.value}"
        return f"session {self.value}"

    def refusal(self) -> str:
        """What a new connection that matches is told."""
        return f"{self.what} is locked by an operator: {self.reason} (lock {self.id})"

    def ending(self) -> str:
        """What a live session that matches is told before it ends."""
        if self.kind == "session":
            who = self.created_by.get("email") or self.created_by.get("subject") or "an operator"
            return f"this session was ended by an operator ({who}): {self.reason}"
        return f"this session was ended: {self.what} was locked by an operator: {self.reason} (lock {self.id})"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "value": self.value, "reason": self.reason,
                "created_by": self.created_by, "created": self.created, "until": self.until,
                "removed": self.removed, "active": self.active()}
