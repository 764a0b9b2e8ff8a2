"""Export a recording as asciicast v2 or v3 (asciinema), JSON, or plain text.

Everything streams: events are written as they are read, one segment in memory at a time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import IO, Any

from recorder.events import Event
from replay.reader import SessionSummary

FORMATS = ("asciicast-v2", "asciicast-v3", "json", "text")
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])")


def marker_label(data: Any) -> str:
    """A one-line label for a marker event (asciicast markers are strings)."""
    if not isinstance(data, dict):
        return str(data)
    kind = data.get("type", "marker")
    details = ", ".join(f"{k}={v}" for k, v in data.items() if k != "type" and v is not None)
    return f"{kind}: {details}" if details else kind


def _size(summary: SessionSummary) -> tuple[int, int]:
    term = summary.meta.get("term") or {}
    return int(term.get("cols") or 80), int(term.get("rows") or 24)


def _header(summary: SessionSummary) -> dict[str, Any]:
    identity = summary.identity
    where = f"{summary.meta.get('login')}@{summary.meta.get('target')}" if summary.meta.get("login") else summary.meta.get("target")
    return {"timestamp": int(summary.started_at.timestamp()),
            "title": f"{identity.get('subject', '?')} → {where}: {summary.meta.get('command') or summary.meta.get('kind')}"}


def _text(event: Event) -> str:
    data = event.stream_bytes() or b""
    return data.decode("utf-8", "replace")


def write_v2(summary: SessionSummary, events: Iterable[Event], out: IO[str]) -> None:
    cols, rows = _size(summary)
    term = (summary.meta.get("term") or {}).get("type") or "xterm"
    header = {"version": 2, "width": cols, "height": rows, **_header(summary), "env": {"TERM": term}}
    out.write(json.dumps(header, ensure_ascii=False) + "\n")
    for event in events:
        line = _v2_event(event)
        if line is not None:
            out.write(json.dumps(line, ensure_ascii=False) + "\n")


def _v2_event(event: Event) -> list[Any] | None:
    t = round(event.t, 6)
    if event.stream in ("o", "e"):
        return [t, "o", _text(event)]  # a terminal shows stderr too
    if event.stream == "i":
        return [t, "i", _text(event)]
    if event.code == "r":
        return [t, "r", event.data]
    if event.code == "m":
        return [t, "m", marker_label(event.data)]
    if event.code == "x":
        return [t, "m", _exit_label(event.data)]
    return None


def _exit_label(data: Any) -> str:
    data = data or {}
    if data.get("signal"):
        return f"exit: killed by signal {data['signal']}"
    return f"exit: status {data.get('status')}" + (f" ({data['reason']})" if data.get("reason") else "")


def write_v3(summary: SessionSummary, events: Iterable[Event], out: IO[str]) -> None:
    cols, rows = _size(summary)
    term = (summary.meta.get("term") or {}).get("type")
    header = {"version": 3, "term": {"cols": cols, "rows": rows, **({"type": term} if term else {})}, **_header(summary)}
    out.write(json.dumps(header, ensure_ascii=False) + "\n")
    last = 0.0
    for event in events:
        line = _v2_event(event)
        if event.code == "x":
            data = event.data or {}
            line = [event.t, "x", str(data.get("status") if data.get("status") is not None else 128)]
        if line is None:
            continue
        line[0] = round(max(event.t - last, 0.0), 6)  # v3 times are intervals
        last = event.t
        out.write(json.dumps(line, ensure_ascii=False) + "\n")


def write_json(summary: SessionSummary, events: Iterable[Event], out: IO[str]) -> None:
    out.write('{"session": ' + json.dumps(summary.meta, ensure_ascii=False))
    out.write(', "end": ' + json.dumps(summary.end or None, ensure_ascii=False) + ', "events": [')
    for i, event in enumerate(events):
        out.write(("\n" if i == 0 else ",\n") + json.dumps([event.t, event.code, event.data], ensure_ascii=False))
    out.write("\n]}\n")


def write_text(summary: SessionSummary, events: Iterable[Event], out: IO[str]) -> None:
    for event in events:
        if event.stream in ("o", "e"):
            out.write(ANSI.sub("", _text(event)).replace("\r\n", "\n"))


WRITERS = {"asciicast-v2": write_v2, "asciicast-v3": write_v3, "json": write_json, "text": write_text}
