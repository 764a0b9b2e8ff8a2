"""``[mcp]`` in the config file: how the MCP front door waits and pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bastion.identity.delegation import TableReader


@dataclass(frozen=True)
class McpSettings:
    enabled: bool = True
    # How long one tool call waits for an approval before it answers "pending" (the request
    # lives on until its rule's timeout; `approval_status` waits again).
    approval_wait: float = 60.0
    # The most output (per stream) one tool result carries; the rest is paged with session_output.
    page_bytes: int = 32768
    # How often a waiting call sends a progress notification.
    progress_interval: float = 2.0


KEYS = {"enabled", "approval_wait", "page_bytes", "progress_interval"}


def parse_mcp(r: TableReader, t: dict[str, Any]) -> McpSettings:
    p = "mcp."
    r.unknown(t, KEYS, p)
    wait = r.duration(t, "approval_wait", p, 60.0)
    if not 0 <= wait <= 3600:
        r.problems.append((f"{p}approval_wait", "must be between 0s and 1h (MCP clients time out long calls)"))
        wait = 60.0
    page = r.get(t, "page_bytes", p, int, 32768)
    if not 1024 <= page <= 4 * 1024 * 1024:
        r.problems.append((f"{p}page_bytes", "must be between 1024 and 4194304"))
        page = 32768
    interval = r.duration(t, "progress_interval", p, 2.0)
    if not 0.1 <= interval <= 60:
        r.problems.append((f"{p}progress_interval", "must be between 0.1s and 60s"))
        interval = 2.0
    return McpSettings(enabled=r.get(t, "enabled", p, bool, True), approval_wait=wait, page_bytes=page,
                       progress_interval=interval)
