"""Real-time playback with seeking, in the user's terminal.

Seeking never replays from the start: the player opens the segment that covers the
wanted time, draws that segment's screen snapshot, writes the segment's output up to
the wanted time at once, and plays on from there. One segment is in memory at a time.

Keys while playing: space pause/resume, ←/→ 10 s back/forward, ] next marker,
+/- speed ×2/÷2, q quit.
"""

from __future__ import annotations

import os
import select
import sys
import time
from collections.abc import Iterator
from typing import BinaryIO

from recorder.events import Event
from recorder.segment import SegmentError, parse_segment
from recorder.store import NotFound, RecordingStore
from replay.reader import ReplayError, SessionSummary, segment_keys

CLEAR = b"\x1b[0m\x1b[H\x1b[2J"


class Player:
    def __init__(self, store: RecordingStore, summary: SessionSummary, out: BinaryIO,
                 speed: float = 1.0, idle_limit: float | None = None) -> None:
        self.store = store
        self.summary = summary
        self.out = out
        self.speed = speed
        self.idle_limit = idle_limit
        self.keys = segment_keys(summary)
        records = (summary.manifest or {}).get("segments")
        self.starts: list[float] | None = [float(r["t_start"]) for r in records] if records else None
        self.duration = float((summary.manifest or {}).get("end", {}).get("duration") or 0.0)
        self._status_at = 0.0

    def _segment(self, index: int) -> tuple[dict, list[Event]]:
        key = self.keys[index]
        try:
            return parse_segment(self.store.get(key), key)
        except NotFound:
            raise ReplayError(f"segment {key} is missing; playback stops here") from None
        except SegmentError as exc:
            raise ReplayError(f"{exc}; playback stops here") from None

    def segment_index(self, t: float) -> int:
        """The last segment starting at or before ``t``."""
        if self.starts is None:  # live session: headers only
            self.starts = [float(self._segment(i)[0]["t"]) for i in range(len(self.keys))]
        # Strictly before t: a segment starting exactly at t may follow events stamped t,
        # which belong after the seek point's snapshot, not inside it.
        index = 0
        for i, start in enumerate(self.starts):
            if start < t:
                index = i
        return index

    def _drawable(self, index: int) -> int:
        """The nearest segment at or before ``index`` whose header has a screen snapshot
        (segments cut in quick succession carry none: see recorder/snapshot.py)."""
        records = (self.summary.manifest or {}).get("segments")
        while index > 0:
            if records and "snapshot" in records[index]:
                has = bool(records[index]["snapshot"])
            else:
                has = self._segment(index)[0].get("snapshot") is not None
            if has:
                return index
            index -= 1
        return 0

    def events_from(self, t: float) -> Iterator[tuple[bool, Event | bytes]]:
        """(instant, item): the redraw for ``t`` first (instant), then timed events."""
        if not self.keys:
            return
        first = self._drawable(self.segment_index(t))
        header, events = self._segment(first)
        snapshot = header.get("snapshot")
        if t > 0 or first > 0:
            yield True, CLEAR + (snapshot["ansi"].encode() if snapshot else b"")
        for event in events:
            yield event.t < t, event
        for index in range(first + 1, len(self.keys)):
            _, events = self._segment(index)
            for event in events:
                yield event.t < t, event

    def render_until(self, t: float) -> None:
        """Write the screen as it is at ``t`` (for seeking and for tests)."""
        for instant, item in self.events_from(t):
            if isinstance(item, bytes):
                self.out.write(item)
            elif not instant:
                break
            elif item.stream in ("o", "e"):
                self.out.write(item.stream_bytes() or b"")
        self.out.flush()

    def play(self, start: float = 0.0, keys: KeyReader | None = None) -> None:
        position = start
        while True:
            jump = self._play_from(position, keys)
            if jump is None:
                return
            position = max(0.0, jump)

    def _play_from(self, start: float, keys: KeyReader | None) -> float | None:
        """Play from ``start``; return a new position to seek to, or None when done or quit."""
        wall0, rec0, last = time.monotonic(), start, start
        if keys is not None:
            self.show_status(start, bar=start > 0)
        skip_to_marker = False
        for instant, item in self.events_from(start):
            if isinstance(item, bytes):
                self.out.write(item)
                continue
            event = item
            if not instant and not skip_to_marker:
                gap = event.t - last
                if self.idle_limit is not None and gap > self.idle_limit:
                    rec0 -= gap - self.idle_limit  # shift the clock: the pause is cut short
                due = wall0 + (event.t - rec0) / self.speed
                while True:
                    wait = due - time.monotonic()
                    # At most a second per read: the position shown moves on during a pause in the output.
                    key = keys.read(min(max(wait, 0), 1.0)) if keys else None
                    if key is None and keys is not None and due - time.monotonic() > 0:
                        self.show_status(rec0 + (time.monotonic() - wall0) * self.speed)
                        continue
                    if key is None or keys is None:
                        if wait > 0 and keys is None:
                            self.out.flush()
                            time.sleep(wait)
                        break
                    action = self._key(key, event.t, keys)
                    if action == "quit":
                        return None
                    if isinstance(action, float):
                        return action
                    if action == "marker":
                        skip_to_marker = True
                        break
                    wall0, rec0 = time.monotonic(), last  # speed change or resume: restart the clock here
                    due = wall0 + (event.t - rec0) / self.speed
            if skip_to_marker and event.code == "m":
                skip_to_marker = False
                wall0, rec0 = time.monotonic(), event.t
            last = event.t
            if event.stream in ("o", "e"):
                self.out.write(event.stream_bytes() or b"")
                if keys is not None:
                    if time.monotonic() - self._status_at >= 1.0:
                        self.show_status(last)
                    self.out.flush()
        self.out.flush()
        return None

    def _key(self, key: bytes, now: float, keys: KeyReader) -> str | float | None:
        if key in (b"q", b"\x03"):
            return "quit"
        if key == b" ":
            self.show_status(now, "paused", bar=True)
            while (k := keys.read(None)) not in (b" ", b"q", b"\x03"):
                pass
            return "quit" if k != b" " else "resume"
        if key == b"\x1b[C":
            return now + 10.0
        if key == b"\x1b[D":
            return max(0.0, now - 10.0)
        if key == b"]":
            return "marker"
        if key == b"+":
            self.speed *= 2
        elif key == b"-":
            self.speed /= 2
        self.show_status(now, bar=True)
        return "speed"

    # -- where playback is: the terminal's title, and a bar on the bottom line on demand -------

    def status(self, t: float, state: str = "playing") -> str:
        total = f" / {_clock(self.duration)}" if self.duration else ""
        return f"{state} {_clock(max(0.0, t))}{total}  speed x{self.speed:g}"

    def show_status(self, t: float, state: str = "playing", bar: bool = False) -> None:
        """The position and speed in the terminal's title (always) and, after a key, on the
        bottom line in reverse video (the next output draws over it)."""
        self._status_at = time.monotonic()
        text = self.status(t, state)
        self.out.write(f"\x1b]2;replay {self.summary.id}: {text}\x07".encode())
        if bar:
            help_text = "  space pause  <- -> 10s  ] marker  + - speed  q quit"
            self.out.write(f"\x1b7\x1b[999;1H\x1b[7m {text}{help_text} \x1b[0m\x1b[K\x1b8".encode())
        self.out.flush()


def _clock(t: float) -> str:
    minutes, seconds = divmod(int(t), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class KeyReader:
    """Keys from a terminal in cbreak mode (restored on exit)."""

    def __init__(self, fd: int) -> None:
        import termios
        import tty

        self.fd = fd
        self._saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

    def read(self, timeout: float | None) -> bytes | None:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return None
        data = os.read(self.fd, 8)
        return data[:3] if data.startswith(b"\x1b[") else data[:1]

    def close(self) -> None:
        import termios

        termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)


def open_keys() -> KeyReader | None:
    if sys.stdin.isatty() and sys.stdout.isatty():
        try:
            return KeyReader(sys.stdin.fileno())
        except OSError:
            return None
    return None
