"""Terminal screen snapshots, so replay can seek without replaying from the start.

A Python terminal emulator (pyte) handles well under 1 MB/s, while a gateway relays
hundreds, so the emulator must stay off the hot path:

* On the event loop, ``ScreenTracker.feed()`` only keeps the output since the last
  snapshot, trimmed to ``tail_limit`` bytes (8 bytes per screen cell: enough to redraw
  a full screen several times over).
* In the recorder's worker thread, ``apply()`` feeds that tail to the emulator (after a
  reset when older output was dropped) and ``snapshot()`` renders the screen.
* The recorder takes a snapshot at most once per ``SNAPSHOT_EVERY`` seconds of session
  or ``SNAPSHOT_BYTES`` of output; segments cut faster than that carry none, and the
  player starts from the last segment that has one (``snapshot_due``).
* A quiet session (typing, a prompt) gets one per ``SNAPSHOT_QUIET`` seconds unless
  ``SNAPSHOT_QUIET_BYTES`` of output came since the last: a seek then writes at most
  that much output, or 30 s of a quiet session, after the snapshot. Every segment of
  1,000 typing sessions carried one before, a fifth of the recorder's seal time.

When output was dropped, the screen is rebuilt from the tail alone: exact for anything
that scrolls or redraws within it (shells, logs, full-screen programs), approximate only
for a screen region left untouched by the last ``tail_limit`` bytes. Of a tail of plain
lines (a build log, ``cat``), only the last screenful of lines is fed (``screen_tail``):
the same screen for a tenth of the emulator's time.

Bulk output gets a snapshot every ``SNAPSHOT_BYTES`` (8 MiB; 4 MiB before issue 21): a
seek then decodes at most about three 4 MiB segments after the snapshot it starts from.

pyte is not robust against every sequence real programs send (``ESC [ ? 4 m`` from
``vi -u NONE`` raises a TypeError inside it). An exception in the emulator never ends the
session or its recording: the screen is reset, the output that raised is skipped, and the
next snapshot carries ``"degraded": true`` (replay starts from a screen that may lack what
that output drew; the recorded bytes themselves are complete).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections import deque
from collections.abc import Callable
from typing import Any

import pyte

_SGR_COLORS = {"black": 0, "red": 1, "green": 2, "brown": 3, "yellow": 3, "blue": 4, "magenta": 5, "cyan": 6, "white": 7}
SNAPSHOT_EVERY = 1.0
SNAPSHOT_BYTES = 8 * 1024 * 1024
SNAPSHOT_QUIET = 30.0
SNAPSHOT_QUIET_BYTES = 64 * 1024


def snapshot_due(seconds: float, output_bytes: int) -> bool:
    """Whether a segment cut ``seconds`` and ``output_bytes`` after the last snapshot takes one."""
    if output_bytes >= SNAPSHOT_BYTES:
        return True
    return seconds >= SNAPSHOT_EVERY and (output_bytes >= SNAPSHOT_QUIET_BYTES or seconds >= SNAPSHOT_QUIET)


def _no_private(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: Any, *args: Any, private: bool = False, **kwargs: Any) -> Any:
        return method(self, *args, **kwargs)
    return call


def _takes_private(method: Callable[..., Any]) -> bool:
    params = inspect.signature(method).parameters.values()
    return any(p.name == "private" or p.kind is p.VAR_KEYWORD for p in params)


class TolerantScreen(pyte.Screen):
    """A pyte screen whose CSI handlers all accept the ``private`` flag (``ESC [ ? … X``):
    pyte passes it to every handler, and most of them raise a TypeError on it."""


for _name in set(pyte.Stream.csi.values()):
    _method = getattr(pyte.Screen, _name, None)
    if _method is not None and not _takes_private(_method):
        setattr(TolerantScreen, _name, _no_private(_method))


class ScreenTracker:
    def __init__(self, cols: int, rows: int) -> None:
        self.cols, self.rows = max(cols, 1), max(rows, 1)
        self.tail_limit = max(8 * self.cols * self.rows, 16 * 1024)
        self._screen = TolerantScreen(self.cols, self.rows)
        self._stream = pyte.ByteStream(self._screen)
        self._pending: deque[bytes] = deque()
        self._pending_len = 0
        self._dropped = False
        # An emulator exception since the last snapshot (see the module's docstring).
        self.degraded = False

    # -- event loop side: cheap ---------------------------------------------------------

    def feed(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_len += len(data)
        while self._pending_len - len(self._pending[0]) > self.tail_limit:
            self._pending_len -= len(self._pending.popleft())
            self._dropped = True

    def take(self) -> tuple[bytes, bool]:
        """The output since the last take (its tail), and whether older output was dropped."""
        tail, dropped = b"".join(self._pending), self._dropped
        self._pending.clear()
        self._pending_len = 0
        self._dropped = False
        if dropped:
            tail = tail[-self.tail_limit:]
            cut = tail.find(b"\n", 0, 4096)  # start on a line boundary, not inside an escape sequence
            tail = tail[cut + 1:] if cut >= 0 else tail
        return tail, dropped

    # -- worker thread side: the emulator -------------------------------------------------

    def apply(self, tail: bytes, dropped: bool) -> None:
        try:
            if dropped:
                self._screen.reset()
                tail = screen_tail(tail, self.rows)
            self._stream.feed(tail)
        except Exception:  # a pyte bug must not end the recording: see the module's docstring
            self._recover()

    def _recover(self) -> None:
        self.degraded = True
        self._screen = TolerantScreen(self.cols, self.rows)
        self._stream = pyte.ByteStream(self._screen)

    def resize(self, cols: int, rows: int) -> None:
        self.cols, self.rows = max(cols, 1), max(rows, 1)
        self.tail_limit = max(8 * self.cols * self.rows, 16 * 1024)
        try:
            self._screen.resize(self.rows, self.cols)
        except Exception:
            self._recover()

    def snapshot(self) -> dict[str, Any]:
        try:
            ansi = render(self._screen)
        except Exception:
            self._recover()
            ansi = render(self._screen)
        shot: dict[str, Any] = {"cols": self.cols, "rows": self.rows,
                                "cursor": [self._screen.cursor.x, self._screen.cursor.y], "ansi": ansi}
        if self.degraded:
            shot["degraded"] = True
            self.degraded = False
        return shot


# What may appear in the rows fed by screen_tail(): CSI sequences that act on the cursor's row
# only (SGR, erase in line, horizontal moves, insert/delete/erase characters) and the charset
# reset that tput sgr0 writes. Anything else (a move up or to an address, an erase of the
# screen, a scroll region, a mode) may make the screen depend on earlier output.
_ROW_ONLY = re.compile(rb"\x1b(?:\[[0-9;:]*[mKGCDX@P]|\(B)")
_SGR = re.compile(rb"\x1b\[[0-9;:]*m")


def screen_tail(tail: bytes, rows: int) -> bytes:
    """The part of ``tail`` that draws the screen a reset emulator shows after all of it.

    pyte costs ~1.5 µs a byte, so on bulk text (a build log, ``cat``) feeding the last ``rows``
    lines instead of the whole tail (16 KiB or more) is what keeps snapshots cheap. Exact when
    those lines start after CR LF (column 0 in both cases) and hold only row-local sequences:
    each of them then lands on the row it would have, counted from the bottom (a wrapped line
    only scrolls more). Colours set before the cut are carried by the last SGR sequence before
    it. Otherwise (full-screen programs, cursor addressing, private modes anywhere in the
    tail) the whole tail, as before."""
    cut = len(tail)
    for _ in range(rows - 1):
        cut = tail.rfind(b"\n", 0, cut)
        if cut < 0:
            return tail
    if cut < 1 or tail[cut - 1] != 0x0D or b"\x1b[?" in tail:
        return tail
    rest = tail[cut + 1:]
    if rest.count(b"\x1b") != len(_ROW_ONLY.findall(rest)):
        return tail
    colours = _SGR.findall(tail, max(0, cut - 4096), cut)
    return (colours[-1] if colours else b"") + rest


def render(screen: pyte.Screen) -> str:
    """Escape sequences that redraw ``screen`` on a terminal of the same size."""
    out = ["\x1b[0m\x1b[H\x1b[2J"]
    for y in range(screen.lines):
        line = screen.buffer[y]
        current = ""
        parts: list[str] = [f"\x1b[{y + 1};1H"]
        last = max((x for x, ch in line.items() if ch.data != " " or ch.bg != "default" or ch.reverse), default=-1)
        for x in range(last + 1):
            ch = line[x]
            sgr = _sgr(ch)
            if sgr != current:
                parts.append(f"\x1b[0;{sgr}m" if sgr else "\x1b[0m")
                current = sgr
            parts.append(ch.data)
        if last >= 0:
            out.append("".join(parts))
    out.append(f"\x1b[0m\x1b[{screen.cursor.y + 1};{screen.cursor.x + 1}H")
    return "".join(out)


def _sgr(ch: Any) -> str:
    codes = []
    if ch.bold:
        codes.append("1")
    if ch.italics:
        codes.append("3")
    if ch.underscore:
        codes.append("4")
    if ch.reverse:
        codes.append("7")
    codes += _color(ch.fg, 30)
    codes += _color(ch.bg, 40)
    return ";".join(codes)


def _color(value: str, base: int) -> list[str]:
    if value == "default":
        return []
    if value in _SGR_COLORS:
        return [str(base + _SGR_COLORS[value])]
    if len(value) == 6:
        try:
            r, g, b = int(value[0:2], 16), int(value[2:4], 16), int(value[4:6], 16)
        except ValueError:
            return []
        return [str(base + 8), "2", str(r), str(g), str(b)]
    return []
