"""The delegation chain (RFC 8693 ``act`` claim) of a token, and the rules that match on it.

A token from an OAuth 2.0 token exchange names its subject (the human or job a piece of work
is done for) in ``sub`` and the party acting for it in ``act``; a nested ``act`` names the
prior actor, so ``{"sub": "alice", "act": {"sub": "subagent", "act": {"sub": "agent"}}}`` is
alice's agent's subagent. The token's signature vouches for the whole claim; here each link
is checked for shape and for an issuer the gateway knows (an actor vouched for by an issuer
that is not configured cannot be traced to anyone: the token is refused), and the chain is
bounded in depth.

Rules (access and approval) can narrow who they match with ``delegated`` (true: only tokens
with a chain; false: only tokens without), ``actors`` (globs: some actor's subject or client id
matches) and ``max_delegation_depth``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from bastion.identity.model import Actor, AuthError, Identity


class TableReader(Protocol):
    """What a section parser uses of bastion.config's reader (typed here, so that this module
    needs no import of bastion.config, which imports it)."""

    problems: list[tuple[str, str]]

    def get(self, table: dict[str, Any], key: str, path: str, kind: Any, default: Any = None,
            required: bool = False) -> Any: ...

    def strings(self, table: dict[str, Any], key: str, path: str,
                default: tuple[str, ...] = ()) -> tuple[str, ...]: ...

    def duration(self, table: dict[str, Any], key: str, path: str, default: float) -> float: ...

    def unknown(self, table: dict[str, Any], known: set[str], path: str) -> None: ...

# The deepest chain any issuer may vouch for (an issuer's max_delegation_depth is at most this).
MAX_DEPTH = 16
DEFAULT_MAX_DEPTH = 4
_MAX_NAME = 512


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def parse_actors(act: Any, issuer: str, trusted: Iterable[str], max_depth: int) -> tuple[Actor, ...]:
    """The chain of a verified token's ``act`` claim, current actor first; AuthError when any
    link is malformed, names an issuer that is not configured, or the chain is too deep."""
    known = {i.rstrip("/") for i in trusted} | {issuer.rstrip("/")}
    actors: list[Actor] = []
    node = act
    while node is not None:
        depth = len(actors) + 1
        if not isinstance(node, dict):
            raise AuthError("bad_actor", f"delegation link {depth} ('act' claim) is not a JSON object: {_show(node)}")
        sub = node.get("sub")
        if not isinstance(sub, str) or not sub.strip() or len(sub) > _MAX_NAME:
            raise AuthError("bad_actor", f"delegation link {depth} ('act' claim) has no usable 'sub': {_show(sub)}")
        iss = node.get("iss")
        if iss is not None and (not isinstance(iss, str) or iss.rstrip("/") not in known):
            raise AuthError("untrusted_actor", f"actor {_show(sub)} (delegation link {depth}) is vouched for by "
                            f"issuer {_show(iss)}, which is not configured: the chain cannot be verified")
        client_id = node.get("client_id")
        if len(actors) >= max_depth:
            raise AuthError("delegation_too_deep", f"the token's delegation chain is deeper than the "
                            f"{max_depth} links this issuer may vouch for (max_delegation_depth)")
        actors.append(Actor(subject=sub, issuer=iss,
                            client_id=client_id if isinstance(client_id, str) and client_id else None))
        node = node.get("act")
    return tuple(actors)


@dataclass(frozen=True)
class DelegationScope:
    """The delegation part of a rule's *who*: empty matches any identity."""

    delegated: bool | None = None
    actors: tuple[str, ...] = ()
    max_depth: int | None = None

    def __bool__(self) -> bool:
        return self.delegated is not None or bool(self.actors) or self.max_depth is not None

    def matches(self, identity: Identity) -> bool:
        if self.delegated is not None and identity.delegated != self.delegated:
            return False
        if self.actors and not any(fnmatch.fnmatchcase(name, p) for a in identity.actors
                                   for name in (a.subject, a.client_id) if name for p in self.actors):
            return False
        return self.max_depth is None or len(identity.actors) <= self.max_depth

    def why_not(self, identity: Identity) -> str | None:
        """Why an identity that is otherwise named falls outside (for refusal messages)."""
        if self.delegated is False and identity.delegated:
            return f"it does not accept delegated tokens (you act as {identity.chain})"
        if self.delegated and not identity.delegated:
            return "it only applies to delegated tokens"
        if self.max_depth is not None and len(identity.actors) > self.max_depth:
            return (f"your delegation chain ({identity.chain}) has {len(identity.actors)} links, "
                    f"more than its max_delegation_depth of {self.max_depth}")
        if self.actors and not self.matches(identity):
            return f"no actor of your chain ({identity.chain}) matches {', '.join(self.actors)}"
        return None


DELEGATION_KEYS = {"delegated", "actors", "max_delegation_depth"}


def parse_scope(r: TableReader, t: dict[str, Any], p: str) -> DelegationScope:
    """``delegated``, ``actors`` and ``max_delegation_depth`` of a rule table."""
    delegated = r.get(t, "delegated", p, bool, None)
    depth = r.get(t, "max_delegation_depth", p, int, None)
    if depth is not None and not 0 <= depth <= MAX_DEPTH:
        r.problems.append((f"{p}max_delegation_depth", f"must be between 0 and {MAX_DEPTH}, got {depth}"))
        depth = None
    return DelegationScope(delegated=delegated, actors=r.strings(t, "actors", p), max_depth=depth)


def chain_fields(identity: Identity) -> dict[str, Any]:
    """Audit-log fields of a delegated identity (nothing for a direct one)."""
    if not identity.actors:
        return {}
    return {"actors": [a.subject for a in identity.actors], "chain": identity.chain}
