"""Access policy: may this identity open a session on this target with this login?

Rules are checked in order; the first rule whose *who* (any listed subject, group or
claim) and *where* (target and login globs) both match decides. No match: refused.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from bastion.config import AccessRule, Config, TargetConfig
from bastion.identity import Identity
from bastion.identity.delegation import DelegationScope
from bastion.who import NamesWho, matches_identity

__all__ = ["Decision", "NamesWho", "authorize", "matches_identity", "reachable_targets"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: AccessRule | None
    reason: str


def _any_glob(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def authorize(config: Config, identity: Identity, target: TargetConfig, login: str) -> Decision:
    if login not in target.logins:
        return Decision(False, None, f"login {login!r} is not allowed on target {target.name!r} "
                                     f"(allowed: {', '.join(target.logins)})")
    for rule in config.access:
        if (matches_identity(rule, identity) and _any_glob(target.name, rule.targets)
                and _any_glob(login, rule.logins)):
            return Decision(True, rule, f"allowed by {rule.name}")
    return Decision(False, None, f"no access rule lets {identity.chain} use {login}@{target.name}"
                    + delegation_hint(config.access, identity, lambda r: _any_glob(target.name, r.targets)
                                      and _any_glob(login, r.logins)))


def delegation_hint(rules: Iterable[AccessRule], identity: Identity, where: Callable[[AccessRule], bool]) -> str:
    """Why a rule that names this identity and place did not apply, when its delegation scope
    is the reason (else nothing): a refused agent should learn that its chain was the cause."""
    for rule in rules:
        if rule.delegation and where(rule) and matches_identity(replace(rule, delegation=DelegationScope()), identity):
            why = rule.delegation.why_not(identity)
            if why:
                return f" (rule {rule.name!r} would, but {why})"
    return ""


def reachable_targets(config: Config, identity: Identity) -> list[str]:
    """Target names this identity may use with at least one login (for helpful errors)."""
    return [t.name for t in config.targets
            if any(authorize(config, identity, t, login).allowed for login in t.logins)]
