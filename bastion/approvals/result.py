"""What the approval gate answers for one command (bastion/approvals/engine.py decides;
sessions and front doors read it). Imports nothing of the project."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GateResult:
    allowed: bool
    # allowed | approved | denied | expired | cancelled | rate-limited | error
    outcome: str
    reason: str = ""
    request_id: str | None = None
    rule: str | None = None
