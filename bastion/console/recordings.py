"""Recordings for the console, through the ``replay`` library the CLI uses: the same listing and
filters as ``replay ls``, the same search as ``replay search``, the same checks as
``replay verify``, the same package as ``replay evidence``. Store calls block, so each runs
in a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from recorder.store import RecordingStore
from replay.asciicast import marker_label, write_v2
from replay.cli import Filters
from replay.reader import ReplayError, SessionSummary, iter_events, list_sessions, open_session
from replay.search import Hit, search_session
from replay.verify import verify_session

T = TypeVar("T")
MAX_HITS = 500
FILTER_NAMES = ("since", "until", "subject", "group", "target", "login", "command")
FLAG_NAMES = ("approved", "masked")


@dataclass(frozen=True)
class Verdict:
    state: str  # "verified", "failed", "live" (not sealed yet)
    problems: tuple[str, ...] = ()

    @property
    def playable_as_fine(self) -> bool:
        return self.state == "verified"


@dataclass(frozen=True)
class Marker:
    t: float
    kind: str
    label: str


def _label(data: Any) -> str:
    """The marker as a person reads it (the masking log's keyed hashes stay out of sight)."""
    if isinstance(data, dict) and data.get("type") == "command":
        return f"command ({data.get('outcome', '?')}): {data.get('command', '')}"
    if isinstance(data, dict) and data.get("type") == "masking":
        counts: dict[str, int] = {}
        for value in data.get("values") or []:
            if isinstance(value, list) and value:
                counts[str(value[0])] = counts.get(str(value[0]), 0) + 1
        return "masked: " + ", ".join(f"{k} ×{v}" for k, v in sorted(counts.items()))
    return marker_label(data)


def _exit_label(data: Any) -> str:
    data = data if isinstance(data, dict) else {}
    if data.get("signal"):
        return f"exit: killed by signal {data['signal']}"
    return f"exit: status {data.get('status')}" + (f" ({data['reason']})" if data.get("reason") else "")


def filters_from(query: Any) -> tuple[Filters, dict[str, str]]:
    """Filters from a query string or form (the names of ``replay ls``'s options); raises ValueError."""
    chosen = {n: str(query.get(n)).strip() for n in FILTER_NAMES if str(query.get(n) or "").strip()}
    flags = {n: "1" for n in FLAG_NAMES if str(query.get(n) or "") not in ("", "0")}
    exit_text = str(query.get("exit") or "").strip()
    try:
        exit_status = int(exit_text) if exit_text else None
    except ValueError:
        raise ValueError("exit must be a number") from None
    try:
        found = Filters(**chosen, exit_status=exit_status, approved="approved" in flags,  # type: ignore[arg-type]
                        masked="masked" in flags)
    except Exception as exc:  # click.BadParameter from the time parser
        raise ValueError(getattr(exc, "message", None) or str(exc)) from None
    return found, {**chosen, **flags, **({"exit": exit_text} if exit_text else {})}


class Recordings:
    def __init__(self, store: RecordingStore, trusted_keys: tuple[bytes, ...]) -> None:
        self.store = store
        self.trusted_keys = trusted_keys
        self._verdicts: dict[tuple[str, int], tuple[float, Verdict]] = {}

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.to_thread(fn, *args)

    def select(self, filters: Filters, limit: int = 200) -> list[SessionSummary]:
        found = [s for s in list_sessions(self.store, filters.since) if filters.match(s)]
        return list(reversed(found))[:limit]  # newest first

    def open(self, ref: str) -> SessionSummary:
        return open_session(self.store, ref)

    def verdict(self, summary: SessionSummary) -> Verdict:
        if summary.manifest is None:
            return Verdict("live", ("not sealed yet: the session is running (or was never sealed)",))
        key = (summary.id, len(summary.segment_keys))
        cached = self._verdicts.get(key)
        if cached and time.monotonic() - cached[0] < 60:
            return cached[1]
        result = verify_session(self.store, summary, self.trusted_keys or None)
        verdict = Verdict("verified" if result.ok else "failed", tuple(result.problems))
        self._verdicts[key] = (time.monotonic(), verdict)
        return verdict

    def markers(self, summary: SessionSummary) -> list[Marker]:
        found = []
        for event in iter_events(self.store, summary):
            if event.code == "m":
                kind = event.data.get("type", "marker") if isinstance(event.data, dict) else "marker"
                found.append(Marker(event.t, str(kind), _label(event.data)))
            elif event.code == "x":
                found.append(Marker(event.t, "exit", _exit_label(event.data)))
        return found

    def search(self, pattern: str, filters: Filters, commands_only: bool, ignore_case: bool) -> list[Hit]:
        try:
            compiled = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
        except re.error as exc:
            raise ValueError(f"not a regular expression: {exc}") from None
        hits: list[Hit] = []
        for summary in self.select(filters, limit=1000):
            try:
                for hit in search_session(self.store, summary, compiled, commands_only):
                    hits.append(hit)
                    if len(hits) >= MAX_HITS:
                        return hits
            except ReplayError:
                continue  # unreadable recordings show as failed in the list; search goes on
        return hits

    def cast(self, summary: SessionSummary) -> str:
        out = io.StringIO()
        write_v2(summary, iter_events(self.store, summary), out)
        return out.getvalue()

    def evidence(self, sessions: list[SessionSummary], selection: str) -> Path:
        from replay.evidence import write_package

        folder = Path(tempfile.mkdtemp(prefix="guarita-evidence-"))
        out = folder / time.strftime("guarita-evidence-%Y%m%d-%H%M%S.tar.gz", time.gmtime())
        write_package(self.store, sessions, out, self.trusted_keys, selection)
        return out
