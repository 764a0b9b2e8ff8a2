"""Roles on the HTTP API, from ``[roles]``: operators and auditors (approvers come from the
approval rules). Membership is by subject (or e-mail) or group, with globs."""

from __future__ import annotations

import fnmatch

from bastion.config import RoleMembers, Roles
from bastion.identity import Identity

ROLES = ("operator", "auditor")


def _member(members: RoleMembers, identity: Identity) -> bool:
    if any(fnmatch.fnmatchcase(identity.subject, p) or (identity.email and fnmatch.fnmatchcase(identity.email, p))
           for p in members.subjects):
        return True
    return any(fnmatch.fnmatchcase(g, p) for g in identity.groups for p in members.groups)


def has_role(roles: Roles, identity: Identity, role: str) -> bool:
    if role == "operator":
        return _member(roles.operators, identity)
    if role == "auditor":
        return _member(roles.auditors, identity)
    raise ValueError(f"unknown role {role!r}")


def roles_of(roles: Roles, identity: Identity) -> list[str]:
    return [role for role in ROLES if has_role(roles, identity, role)]
