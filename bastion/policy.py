"""Access policy: may this identity open a session on this target with this login?

Rules are checked in order; the first rule whose *who* (any listed subject, group or
claim) and *where* (target and login globs) both match decides. No match: refused.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

from bastion.config import AccessRule, Config, TargetConfig
from bastion.identity import Identity
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
    return Decision(False, None, f"no access rule lets {identity.display} use {login}@{target.name}")


def reachable_targets(config: Config, identity: Identity) -> list[str]:
    """Target names this identity may use with at least one login (for helpful errors)."""
    return [t.name for t in config.targets
            if any(authorize(config, identity, t, login).allowed for login in t.logins)]
