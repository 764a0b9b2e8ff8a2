"""Reconstructs the command line of an interactive terminal, the way Warpgate's command
detector and JumpServer's parser do: a terminal emulator (pyte) is fed with the
*server's* output, and the keystrokes are used only for three things: where the user
started typing (the prompt boundary), Enter and Ctrl-C.

* The prompt boundary is the cursor position (and the text left of it: the prompt) when
  the first key after the last Enter or Ctrl-C is typed.
* On Enter, the command is the text on screen from the prompt boundary to the end of the
  input, following soft-wrapped rows; rows that a multi-line (bracketed) paste put on
  screen are kept as separate lines. Because the screen is read, what the shell *shows*
  is what counts: history recall (the shell redraws the line), tab completion (the
  completion is echoed), backspace and cursor editing are all handled for free.
* When the shell reprinted the prompt elsewhere (a completion listing, Ctrl-L, scrolling),
  the last row at or above the cursor that starts with the prompt text is used; when no
  prompt is found, the whole logical line at the cursor, less the last known prompt.
* While a full-screen program runs (alternate screen, ``ESC [ ? 1049 h``) nothing is
  parsed; the normal screen is restored when it exits.

pyte is far too slow to see every byte of a large ``cat`` (~2 µs a character), and it runs
on the gateway's event loop: output is buffered and only fed to the emulator when a key
needs the screen, and then only the part the screen still shows:

* The last ``rows`` screen rows of the backlog (whole lines; inside a plain-ASCII line,
  from a row boundary), counted back from the end or from the last escape sequence that
  moves the cursor up or to an address (a prompt's or a shell's redraw): before it, the
  screen must already be whole. Over that tail, the screen comes out as if all of it had
  been fed: the rest is dropped and the screen reset. A first key after 10 MB of ``seq``
  feeds 350 characters at 120x40, not 64 K (bench/approval_detector_stall).
* When no such tail exists within ``tail_limit`` characters (cursor-addressing output
  throughout, or lines too long to count, e.g. many escape sequences), the last
  ``tail_limit`` characters from a line start, as recorder/snapshot.py does:
  ``max(8 * cols * rows, 16 KiB)``. The screen is then rebuilt approximately (exact for
  what scrolls or redraws within the tail).
* A command line longer than the screen is not readable whole (its start, with the
  prompt, has scrolled off): the command is then the part on screen, and ``cut_off`` is
  set (as whenever no prompt anchors the line) so that the gate also checks what was
  typed: a long or space-padded line cannot hide its start.

Terminal state set in dropped output (a scroll region, autowrap off, a saved cursor) is
lost with it. The alternate screen switches are found with a regex over the raw text, so
they are never missed.
"""

from __future__ import annotations

import codecs
import re
import time
from typing import Any

import pyte

from recorder.snapshot import TolerantScreen

_ALT = re.compile(r"\x1b\[\?(?:1049|1047|47)([hl])")
_ESC_TAIL = re.compile(r"\x1b[\[\]?0-9;]*$")
# An escape sequence after which the screen may depend on rows above the cursor (it moves
# up or to an address, scrolls, restores, or sets autowrap, origin or column mode): anything but SGR, erases,
# horizontal moves, insert/delete characters, modes, titles, charsets and keypad modes.
_MOVES = re.compile(r"\x1b(?!\[(?!\?[367][hl])[0-9;:?<=>]*[mKJCDGX@Phl]|[\]\\()=>])")
# Escape sequences that take no cells: what is left after removing them is the line's width.
_ZERO_WIDTH = re.compile(r"\x1b\[[0-9;:]*[mK]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[()][0-9A-Z]")
# The fallback tail is never shorter (a small screen still gets its redraws).
MIN_TAIL_LIMIT = 16 * 1024


class CommandDetector:
    def __init__(self, cols: int, rows: int, tail_limit: int | None = None) -> None:
        self.cols, self.rows = max(cols, 2), max(rows, 2)
        self._fixed_limit = tail_limit
        self.tail_limit = self._limit()
        self.screen = TolerantScreen(self.cols, self.rows)
        self.stream = pyte.Stream(self.screen)
        self._blank = True  # reset and nothing fed since: no row below the cursor holds text
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self._pending: list[str] = []
        self._pending_len = 0
        self._carry = ""
        self.alt_screen = False
        self._saved: tuple[dict[int, dict[int, Any]], int, int] | None = None
        # (row, column, prompt text) when the user started typing; "blind" when they typed
        # before any output followed the last Enter (type-ahead, pasted lines).
        self.boundary: tuple[int, int, str] | None = None
        self.blind = False
        # The last command() found no prompt to anchor on: the line read may be partial.
        self.cut_off = False
        # The emulator raised since the last Enter: the screen is not to be trusted.
        self.degraded = False
        self.last_prompt = ""
        self.last_output = 0.0
        self.last_enter = 0.0
        # The lines so far of a command continued with a backslash-newline (set by the gate).
        self.continuation = ""

    # -- server output -----------------------------------------------------------------

    def output(self, data: bytes) -> None:
        self.last_output = time.monotonic()
        text = self._carry + self._decoder.decode(data)
        self._carry = ""
        tail = _ESC_TAIL.search(text[-12:])
        if tail:  # an escape sequence cut in two: keep its start for the next chunk
            self._carry = tail.group(0)
            text = text[: len(text) - len(self._carry)]
        if "\x1b[?" not in text or not _ALT.search(text):
            if not self.alt_screen:
                self._add(text)
            return
        pos = 0
        for match in _ALT.finditer(text):
            if not self.alt_screen:
                self._add(text[pos:match.start()])
            if match.group(1) == "h" and not self.alt_screen:
                self._enter_alt()
            elif match.group(1) == "l" and self.alt_screen:
                self._leave_alt()
            pos = match.end()
        if not self.alt_screen:
            self._add(text[pos:])

    def resize(self, cols: int, rows: int) -> None:
        self._catch_up()
        self.cols, self.rows = max(cols, 2), max(rows, 2)
        self.tail_limit = self._limit()
        self.screen.resize(self.rows, self.cols)

    def _limit(self) -> int:
        return self._fixed_limit or max(8 * self.cols * self.rows, MIN_TAIL_LIMIT)

    def _add(self, text: str) -> None:
        if not text:
            return
        self._pending.append(text)
        self._pending_len += len(text)
        if self._pending_len > 2 * self.tail_limit:
            self._trim()

    def _trim(self) -> None:
        """Bound the backlog's memory: keep only the tail that will be fed (see _tail_start)."""
        text = "".join(self._pending)
        start = self._tail_start(text)
        self._pending = [text[start:]]
        self._pending_len = len(text) - start
        if start:
            self._reset()

    def _catch_up(self) -> None:
        if not self._pending:
            return
        text = "".join(self._pending)
        self._pending.clear()
        self._pending_len = 0
        # A screenful of characters is fed whole: a few ms, and exact.
        start = self._tail_start(text) if len(text) > self.cols * self.rows else 0
        if start:
            self._reset()
        try:
            self.stream.feed(text[start:])
        except Exception:  # a pyte bug: the screen is lost, never the session
            self.screen = TolerantScreen(self.cols, self.rows)
            self.stream = pyte.Stream(self.screen)
            self.degraded = True
        self._blank = False

    def _reset(self) -> None:
        self.screen.reset()
        self._blank = True

    # -- the tail of a backlog that decides the screen ----------------------------------

    def _tail_start(self, text: str) -> int:
        """Where feeding ``text`` may start (0: at its start, on the screen as it is; else
        on a reset screen): see the module's docstring."""
        end = len(text)
        for _ in range(8):  # redraws: a few in a prompt; more (progress bars): the fallback
            start = self._rows_back(text, end)
            lead = self._lead_in(text, start) if start else None
            move = _MOVES.search(text, lead, end) if lead is not None else None
            if move is None:
                start = start if lead is not None else 0
                return start if len(text) - start <= self.tail_limit else self._cap_start(text)
            end = move.start()
        return self._cap_start(text)

    def _rows_back(self, text: str, end: int) -> int:
        """The start of the last ``rows`` screen rows of ``text[:end]``; 0 when it has fewer
        or they start where the column is unknown."""
        need, pos = self.rows, end
        while pos > 0:
            lf = text.rfind("\n", 0, pos)
            x0 = 0 if lf >= 0 else min(self.screen.cursor.x, self.cols)
            line = text[lf + 1:pos].removesuffix("\r")
            n = _rows(line, x0, self.cols)
            if n >= need:
                return self._cut(text, lf + 1, line, x0, n - need)
            need -= n
            pos = lf
        return 0

    def _lead_in(self, text: str, cut: int) -> int | None:
        """The start of the output before ``cut`` whose line feeds and wraps leave the cursor
        on the bottom row at ``cut`` from wherever it was, provided nothing in it moves the
        cursor up: every row after ``cut`` then scrolls in blank. None: the backlog is too
        short, the cursor not low enough and the screen not blank."""
        need, pos = self.rows - 1, cut
        while pos > 0:
            lf = text.rfind("\n", 0, pos)
            x0 = 0 if lf >= 0 else min(self.screen.cursor.x, self.cols)
            need -= _rows(text[lf + 1:pos].removesuffix("\r"), x0, self.cols)
            if need <= 0 and lf >= 0:
                return lf + 1
            if lf < 0:
                break
            pos = lf
        return 0 if self._blank or self.screen.cursor.y >= need else None

    def _cut(self, text: str, begin: int, line: str, x0: int, skip: int) -> int:
        """A start ``skip`` rows into the line at ``begin`` (which starts at column ``x0``)."""
        at_line_start = begin >= 2 and text.startswith("\r\n", begin - 2)
        if skip and _plain(line):
            offset = skip * self.cols - x0
            if offset > 0 or x0 == self.cols or at_line_start:
                return begin + offset
        return begin if at_line_start else 0

    def _cap_start(self, text: str) -> int:
        """The last ``tail_limit`` characters, from a line start if one is near (so not
        inside an escape sequence), as recorder/snapshot.py does."""
        start = max(len(text) - self.tail_limit, 0)
        lf = text.find("\n", start, start + 4096)
        return lf + 1 if lf >= 0 else start

    def _enter_alt(self) -> None:
        self._catch_up()
        buffer = {y: dict(row) for y, row in self.screen.buffer.items()}
        self._saved = (buffer, self.screen.cursor.x, self.screen.cursor.y)
        self.alt_screen = True
        self.boundary = None

    def _leave_alt(self) -> None:
        self.alt_screen = False
        if self._saved is not None:
            buffer, x, y = self._saved
            self.screen.buffer.clear()
            for row_y, row in buffer.items():
                self.screen.buffer[row_y].update(row)
            self.screen.cursor.x, self.screen.cursor.y = x, y
            self._saved = None
            self._blank = False
        self.boundary = None

    # -- keys ------------------------------------------------------------------------------

    def keys(self, data: bytes) -> None:
        """Keys forwarded to the server (never an Enter: see :meth:`enter`)."""
        if self.alt_screen or not data:
            return
        if b"\x03" in data:  # Ctrl-C: the shell abandons the line
            self.boundary = None
            self.continuation = ""
            data = data[data.rindex(b"\x03") + 1:]
            if not data:
                return
        if self.boundary is None:
            self.blind = self.last_output < self.last_enter
            self._catch_up()
            x, y = self.screen.cursor.x, self.screen.cursor.y
            prompt = self.screen.display[y][:x] if not self.blind else ""
            self.boundary = (y, x, prompt)
            if prompt.strip() and not self.blind:
                self.last_prompt = prompt

    def enter(self) -> None:
        """An Enter went to the server: the next key starts a new command line."""
        self.boundary = None
        self.degraded = False
        self.last_enter = time.monotonic()

    def cancel(self) -> None:
        self.boundary = None
        self.continuation = ""

    def continue_after(self, line: str) -> None:
        """Called with each line that went to the shell: a trailing backslash continues it."""
        self.continuation = self.continuation + line[:-1] if line.endswith("\\") else ""

    def joined(self, line: str) -> str:
        """``line`` with the lines it continues (``''`` when it continues none)."""
        return self.continuation + line if self.continuation else ""

    # -- the command line ----------------------------------------------------------------

    def command(self) -> str:
        """The command line on screen now (several lines for a multi-line paste), '' when
        nothing was typed since the last Enter or a full-screen program runs."""
        if self.alt_screen or self.boundary is None:
            return ""
        self._catch_up()
        rows = self.screen.display
        cy = min(self.screen.cursor.y, self.rows - 1)
        y0, x0, prompt = self.boundary
        start: tuple[int, int] | None = None
        if not self.blind and prompt.strip():
            for r in range(cy, -1, -1):
                if rows[r][:x0] == prompt:
                    start = (r, x0)
                    break
        elif not self.blind and y0 <= cy:
            start = (y0, x0)
        self.cut_off = False
        if start is None:  # no prompt to anchor on: the logical line at the cursor
            r = cy
            while r > 0 and _full(rows[r - 1]):
                r -= 1
            start = (r, 0)
            # Where typing started is not on screen (scrolled off behind a long or padded
            # line, or redrawn away): what is shown may not be the whole command.
            self.cut_off = True
        r0, x = start
        end = r0
        while end + 1 < len(rows) and _full(rows[end]):
            end += 1
        end = max(end, cy)
        parts: list[str] = []
        for i in range(r0, end + 1):
            seg = rows[i][x if i == r0 else 0:]
            if i < end and _full(rows[i]):
                parts.append(seg)
            else:
                parts.append(seg.rstrip() + ("\n" if i < end else ""))
        text = "".join(parts)
        if start[1] == 0 and self.last_prompt.strip():
            stripped = self.last_prompt.strip()
            if text.lstrip().startswith(stripped):
                text = text.lstrip()[len(stripped):]
        return "\n".join(line.strip() for line in text.strip().split("\n") if line.strip())


def _full(row: str) -> bool:
    return bool(row) and row[-1] != " "


def _plain(line: str) -> bool:
    return line.isascii() and line.isprintable()


def _rows(line: str, x0: int, cols: int) -> int:
    """Screen rows a line (no line feed) covers from column ``x0``; a lower bound (1) when
    its width is not plain (tabs, wide characters, carriage returns, cursor moves)."""
    if "\x1b" in line:
        line = _ZERO_WIDTH.sub("", line)
    if not _plain(line):
        return 1
    return max(1, -(-(x0 + len(line)) // cols))


class LineEditor:
    """What the user typed since the last Enter, with the simple line-editing keys applied
    (backspace, Ctrl-U, Ctrl-W) and other control keys and escape sequences dropped.

    Used as a second opinion when the screen cannot be trusted yet (the shell has not
    echoed the line: type-ahead behind a running command, pasted lines)."""

    _ESC = re.compile(r"\x1b(\[[0-9;?]*[ -/]*[@-~]|O.|[^\[O])")

    def __init__(self) -> None:
        self.text: list[str] = []
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def keys(self, data: bytes) -> None:
        s = self._ESC.sub("", self._decoder.decode(data).replace("\x1b[200~", "").replace("\x1b[201~", ""))
        for ch in s:
            if ch in ("\x7f", "\x08"):
                if self.text:
                    self.text.pop()
            elif ch in ("\x15", "\x03"):
                self.text.clear()
            elif ch == "\x17":
                while self.text and self.text[-1] == " ":
                    self.text.pop()
                while self.text and self.text[-1] != " ":
                    self.text.pop()
            elif ch == "\t" or ch >= " ":
                self.text.append(" " if ch == "\t" else ch)
            elif ch in "\r\n":
                self.text.append("\n")

    def line(self) -> str:
        return "\n".join(part.strip() for part in "".join(self.text).split("\n") if part.strip())

    def clear(self) -> None:
        self.text.clear()
