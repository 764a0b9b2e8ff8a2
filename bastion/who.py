"""Who a rule names: one definition for access rules (bastion/policy.py) and approval
rules (bastion/approvals/rules.py). Imports only the identity model, so the config, the
policy and the approval rules can all use it."""

from __future__ import annotations

import fnmatch
from typing import Protocol

from bastion.identity.model import Identity


class NamesWho(Protocol):
    """Any rule that names identities: access rules, approval rules."""

    @property
    def subjects(self) -> tuple[str, ...]: ...

    @property
    def groups(self) -> tuple[str, ...]: ...

    @property
    def claims(self) -> tuple[tuple[str, str], ...]: ...


def _any_glob(value: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


def matches_identity(rule: NamesWho, identity: Identity) -> bool:
    """Any listed subject (or e-mail), any listed group, or all listed claims (globs); and the
    rule's delegation scope, when it has one (bastion/identity/delegation.py)."""
    delegation = getattr(rule, "delegation", None)
    if delegation and not delegation.matches(identity):
        return False
    if rule.subjects and (_any_glob(identity.subject, rule.subjects)
                          or (identity.email and _any_glob(identity.email, rule.subjects))):
        return True
    if rule.groups and any(_any_glob(g, rule.groups) for g in identity.groups):
        return True
    return bool(rule.claims) and all(
        name in identity.claims and fnmatch.fnmatchcase(identity.claims[name], pattern)
        for name, pattern in rule.claims)
