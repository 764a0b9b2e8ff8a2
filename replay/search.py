"""``replay search``: commands and output lines matching a pattern, with their time offsets.

Output is scanned segment by segment; a line is matched once it is complete (at its
newline), with escape sequences removed, and reported at the time its first byte was
printed, so ``replay play ID --from T`` lands just before it appears.

``replay masked``: where a value was masked, found by its keyed hash in the recordings'
``masking`` markers (docs/recording-format.md), without the value ever being stored.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

from recorder.index import masked_rows
from recorder.store import RecordingStore
from replay.asciicast import ANSI
from replay.reader import SessionSummary, iter_events

MAX_LINE = 64 * 1024  # a pathological line without newline is matched in pieces
# Segments fetched ahead in parallel while one is searched (reads wait on the store).
READERS = 8


@dataclass(frozen=True)
class Hit:
    session: str
    t: float
    kind: str  # "command" or "output"
    text: str


def search_session(store: RecordingStore, summary: SessionSummary, pattern: re.Pattern[str],
                   commands_only: bool = False) -> Iterator[Hit]:
    command = summary.meta.get("command")
    if command and pattern.search(command):
        yield Hit(summary.id, 0.0, "command", command)
    line: list[str] = []
    line_t = 0.0
    for event in iter_events(store, summary, readers=READERS):
        if event.code == "m" and isinstance(event.data, dict) and event.data.get("type") == "command":
            text = str(event.data.get("command", ""))
            if event.data.get("mode") == "exec" and text == command:
                continue  # the exec command's own marker: already found in the metadata, once
            if pattern.search(text):
                yield Hit(summary.id, event.t, "command", text)
            continue
        if commands_only or event.stream not in ("o", "e"):
            continue
        text = (event.stream_bytes() or b"").decode("utf-8", "replace")
        for piece in re.split(r"(\n)", text):
            if piece == "\n" or sum(map(len, line)) > MAX_LINE:
                hit = _line_hit(summary.id, line_t, "".join(line), pattern)
                if hit:
                    yield hit
                line = []
            elif piece:
                if not line:
                    line_t = event.t
                line.append(piece)
    hit = None if commands_only else _line_hit(summary.id, line_t, "".join(line), pattern)
    if hit:  # (commands only: no output line, not even an empty one a match-all pattern finds)
        yield hit


def _line_hit(session: str, t: float, raw: str, pattern: re.Pattern[str]) -> Hit | None:
    text = ANSI.sub("", raw)
    if "\r" in text:  # a redrawn line: what stayed on screen is after the last carriage return
        text = text.rstrip("\r").rsplit("\r", 1)[-1]
    return Hit(session, t, "output", text) if pattern.search(text) else None


@dataclass(frozen=True)
class MaskHit:
    session: str
    t: float
    stream: str
    detector: str
    offset: int
    length: int


def masked_in_session(store: RecordingStore, summary: SessionSummary, hmac: str) -> Iterator[MaskHit]:
    """Every place in the session where the value with this keyed hash was masked."""
    for hit, value_hmac in all_masked_in_session(store, summary):
        if value_hmac == hmac:
            yield hit


def all_masked_in_session(store: RecordingStore, summary: SessionSummary) -> Iterator[tuple[MaskHit, str]]:
    """Every masked value of the session with its keyed hash, in recording order."""
    for event in iter_events(store, summary, readers=READERS):
        if event.code != "m" or not isinstance(event.data, dict) or event.data.get("type") != "masking":
            continue
        for row in masked_rows(event.t, str(event.data.get("stream", "o")), event.data.get("values")):
            yield MaskHit(summary.id, row[0], row[1], row[2], row[3], row[4]), row[5]
