"""The Identity every front door hands to the session pipeline."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class AuthError(Exception):
    """A credential was refused.

    ``reason`` is a short machine-readable code for the audit log and metrics
    (``expired``, ``bad_signature``, ``unknown_issuer`` ...); ``str(err)`` is the
    one-line human explanation. Clients only ever see a generic message.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Actor:
    """One link of a delegation chain (RFC 8693 ``act``): a party acting for the subject."""

    subject: str
    issuer: str | None = None
    client_id: str | None = None

    def to_dict(self) -> dict[str, str]:
        out = {"sub": self.subject}
        if self.issuer:
            out["iss"] = self.issuer
        if self.client_id:
            out["client_id"] = self.client_id
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Actor:
        return cls(subject=str(data["sub"]), issuer=data.get("iss"), client_id=data.get("client_id"))


@dataclass(frozen=True)
class Identity:
    """A verified caller. Built only from a verified token or a gateway-signed certificate."""

    issuer: str
    subject: str
    groups: tuple[str, ...] = ()
    email: str | None = None
    # Selected extra claims (e.g. GitHub Actions' repository, ref) that policy can match.
    claims: dict[str, str] = field(default_factory=dict)
    # Unix time at which the credential stops being valid.
    expires_at: float = 0.0
    # How the identity was proven: "password", "keyboard-interactive", "certificate", "bearer".
    method: str = ""
    # The delegation chain from the token's (verified) ``act`` claim: current actor first, then
    # the prior actors, as RFC 8693 nests them. Empty: the subject acts for itself.
    actors: tuple[Actor, ...] = ()

    @property
    def display(self) -> str:
        return self.email or self.subject

    @property
    def delegated(self) -> bool:
        return bool(self.actors)

    @property
    def chain(self) -> str:
        """Who acts for whom, in the order delegation happened: ``alice via agent via subagent``."""
        return " via ".join([self.display, *(a.subject for a in reversed(self.actors))])

    def to_dict(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer,
            "subject": self.subject,
            "groups": list(self.groups),
            "email": self.email,
            "claims": dict(self.claims),
            "expires_at": self.expires_at,
        } | ({"act": [a.to_dict() for a in self.actors]} if self.actors else {})

    @classmethod
    def from_dict(cls, data: dict[str, Any], method: str = "") -> Identity:
        return cls(
            issuer=str(data["issuer"]),
            subject=str(data["subject"]),
            groups=tuple(str(g) for g in data.get("groups") or ()),
            email=data.get("email"),
            claims={str(k): str(v) for k, v in (data.get("claims") or {}).items()},
            expires_at=float(data.get("expires_at") or 0.0),
            method=method,
            actors=tuple(Actor.from_dict(a) for a in data.get("act") or () if isinstance(a, dict) and a.get("sub")),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True)
