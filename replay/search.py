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
from recorder.summary import MAX_LINE, read_plan
from replay.asciicast import ANSI
from replay.reader import SessionSummary, iter_events, iter_segments, segment_keys

# Segments fetched ahead in parallel while one is searched (reads wait on the store).
READERS = 8


@dataclass(frozen=True)
class Hit:
    session: str
    t: float
    kind: str  # "command" or "output"
    text: str


@dataclass
class SearchStats:
    """Segments a search read and skipped (by their summaries, recorder/summary.py)."""

    read: int = 0
    skipped: int = 0


def search_session(store: RecordingStore, summary: SessionSummary, pattern: re.Pattern[str],
                   commands_only: bool = False, skip: bool = True,
                   stats: SearchStats | None = None) -> Iterator[Hit]:
    """Hits in recording order. ``skip``: leave out the segments whose summaries say they
    cannot hold a match (the hits are the same: a summary never says no wrongly)."""
    command = summary.meta.get("command")
    if command and pattern.search(command):
        yield Hit(summary.id, 0.0, "command", command)
    total = len(segment_keys(summary))
    plan = read_plan(summary.manifest["segments"], pattern) if skip and summary.manifest else None
    indices = None if plan is None else [k for k, _ in plan]
    mid_line = set() if plan is None else {k for k, starts_mid_line in plan if starts_mid_line}
    if stats is not None:
        stats.read += total if indices is None else len(indices)
        stats.skipped += 0 if indices is None else total - len(indices)
    lines = _Lines(summary.id, pattern)
    last = -1
    for k, events in iter_segments(store, summary, READERS, indices):
        if k != last + 1:  # after skipped segments: the line in progress is not matched here
            lines.reset(discard_to_newline=k in mid_line)
        last = k
        for event in events:
            if event.code == "m" and isinstance(event.data, dict) and event.data.get("type") == "command":
                text = str(event.data.get("command", ""))
                if event.data.get("mode") == "exec" and text == command:
                    continue  # the exec command's own marker: already found in the metadata, once
                if pattern.search(text):
                    yield Hit(summary.id, event.t, "command", text)
                continue
            if commands_only or event.stream not in ("o", "e"):
                continue
            yield from lines.feed(event.t, (event.stream_bytes() or b"").decode("utf-8", "replace"))
    # The last line, unless its segment was skipped (commands only: no output line, not even
    # an empty one a match-all pattern finds).
    if last == total - 1 and not commands_only:
        hit = lines.end()
        if hit:
            yield hit


class _Lines:
    """Output text cut into lines, each matched once complete (at its newline)."""

    def __init__(self, session: str, pattern: re.Pattern[str]) -> None:
        self.session = session
        self.pattern = pattern
        self.line: list[str] = []
        self.line_t = 0.0
        self.discarding = False

    def reset(self, discard_to_newline: bool) -> None:
        self.line = []
        self.discarding = discard_to_newline

    def feed(self, t: float, text: str) -> Iterator[Hit]:
        for piece in re.split(r"(\n)", text):
            if self.discarding:  # the end of a line that began in a segment not read
                self.discarding = piece != "\n"
                continue
            if piece == "\n" or sum(map(len, self.line)) > MAX_LINE:
                hit = self.end()
                if hit:
                    yield hit
                self.line = []
            elif piece:
                if not self.line:
                    self.line_t = t
                self.line.append(piece)

    def end(self) -> Hit | None:
        return _line_hit(self.session, self.line_t, "".join(self.line), self.pattern)


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
