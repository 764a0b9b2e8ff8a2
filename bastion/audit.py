"""The audit log: one JSON object per line, to a file or stdout, for a SIEM.

Every authentication result and every session start and end is written here, with the
identity, the source address and the reason, at the moment it happens.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from recorder.recorder import iso


class AuditLog:
    def __init__(self, destination: str = "-") -> None:
        self.destination = destination
        self._lock = threading.Lock()
        # Called with (event, fields) for every event (bastion/metrics.py counts them).
        self.listeners: list[Callable[[str, dict[str, Any]], None]] = []
        if destination == "-":
            self._out: IO[str] = sys.stdout
        else:
            path = Path(destination)
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives as long as the gateway

    def emit(self, event: str, **fields: Any) -> None:
        record = {"ts": iso(time.time()), "event": event, **{k: v for k, v in fields.items() if v is not None}}
        line = json.dumps(record, ensure_ascii=False, default=str, separators=(",", ":"))
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()
        for listener in self.listeners:
            try:
                listener(event, record)
            except Exception:  # a listener's bug must never break the audit stream
                logging.getLogger("guarita.audit").exception("audit listener failed on %s", event)

    def close(self) -> None:
        if self._out is not sys.stdout:
            self._out.close()
