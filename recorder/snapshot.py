"""Terminal screen snapshots, so replay can seek to any segment without replaying from the start.

A pyte screen follows the terminal output. Feeding a Python emulator every byte would
cap throughput at a few MB/s, so the tracker keeps only the output since the last
snapshot, bounded to ``tail_limit`` bytes, and feeds it when a snapshot is taken. When
more than that arrived, the screen is rebuilt from the tail alone: exact for anything
that redraws or scrolls within the tail, approximate only for a screen region left
untouched by the last ``tail_limit`` bytes (documented in docs/recording-format.md).
"""

from __future__ import annotations

from typing import Any

import pyte

_SGR_COLORS = {"black": 0, "red": 1, "green": 2, "brown": 3, "yellow": 3, "blue": 4, "magenta": 5, "cyan": 6, "white": 7}


class ScreenTracker:
    def __init__(self, cols: int, rows: int, tail_limit: int = 256 * 1024) -> None:
        self.cols, self.rows = max(cols, 1), max(rows, 1)
        self.tail_limit = tail_limit
        self._screen = pyte.Screen(self.cols, self.rows)
        self._stream = pyte.Stream(self._screen)
        self._pending: list[str] = []
        self._pending_len = 0

    def feed(self, text: str) -> None:
        self._pending.append(text)
        self._pending_len += len(text)
        if self._pending_len > 2 * self.tail_limit:
            self._trim()

    def resize(self, cols: int, rows: int) -> None:
        self._catch_up()
        self.cols, self.rows = max(cols, 1), max(rows, 1)
        self._screen.resize(self.rows, self.cols)

    def snapshot(self) -> dict[str, Any]:
        self._catch_up()
        return {"cols": self.cols, "rows": self.rows, "cursor": [self._screen.cursor.x, self._screen.cursor.y],
                "ansi": render(self._screen)}

    def _trim(self) -> None:
        joined = "".join(self._pending)[-self.tail_limit:]
        self._pending = [joined]
        self._pending_len = len(joined)
        self._screen.reset()

    def _catch_up(self) -> None:
        if self._pending_len > self.tail_limit:
            self._trim()
        for chunk in self._pending:
            self._stream.feed(chunk)
        self._pending.clear()
        self._pending_len = 0


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
