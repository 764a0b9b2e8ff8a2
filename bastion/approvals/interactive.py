"""The approval gate of an interactive terminal session.

Keys go upstream at once, except an Enter: it is held until the command line it would
run is known (:class:`~bastion.approvals.detector.CommandDetector` reads it from the
screen once the echo of what was typed has arrived) and decided. Allowed: the Enter goes
on. Needs approval: the user is told the request id and the approvers, every key is
dropped except Ctrl-C (which cancels), and the Enter goes on only once approved. Refused,
timed out or cancelled: the remote line is cleared (Ctrl-E Ctrl-U), the user is told why,
and whatever followed the Enter (the rest of a paste) is discarded.

Input that arrives while an Enter is held is queued behind it, so a pasted block is
released line by line, each line checked in turn. A line typed before the shell showed
its prompt (behind a running command) is checked on the typed text too, since the screen
cannot show it yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from bastion.approvals.detector import CommandDetector, LineEditor
from bastion.approvals.keys import Key, first_stop, pending_prefix
from bastion.approvals.shellscan import command_end
from bastion.approvals.unsure import expand_history, why_unsure

if TYPE_CHECKING:
    from bastion.approvals.engine import ApprovalEngine
    from bastion.session import Session

# The echo of typed keys counts as complete once the output has been quiet this long ...
QUIET = 0.025
# ... and is given up on after this long (a prompt that does not echo: the typed text is
# then checked too).
MAX_SETTLE = 0.4
CLEAR_LINE = b"\x05\x15"  # Ctrl-E Ctrl-U: end of line, kill to its start (readline, zle, most REPLs)
# The prompt of bash's incremental history search, left on the line when Enter runs the match.
_SEARCH_PROMPT = re.compile(r"^\((?:failed )?(?:reverse-)?i-search\)`[^'\n]*': ?")
# A logical command longer than this is judged line by line only.
_MAX_PENDING = 256 * 1024
_PASTE_MARK = re.compile(rb"\x1b\[20([01])~")


def _lagging(shown: str, typed: str) -> bool:
    """Whether the screen shows only the start of the typed line. An empty screen does not
    count: it may be a prompt that does not echo (a password), whose typed text is never
    taken for the command."""
    return bool(shown) and len(typed) > len(shown) and typed.startswith(shown)


def _within(shown: str, typed: str) -> bool:
    """Whether the screen shows only a part of the typed line: the rest of the echo did not
    come in time (a loaded target), or the line was read from a boundary inside it (a
    redraw arrived after the first key, or the last prompt was learnt from such a screen).
    See _lagging for the empty screen."""
    return bool(shown) and len(typed) > len(shown) and shown in typed


def _typed_ahead(shown: str, typed: str, blind: bool) -> bool:
    """Whether a line typed ahead (the rest of a paste, while the last command ran) shows
    twice: echoed by the terminal before the prompt, and by the shell after it."""
    return blind and bool(typed) and shown.endswith(typed) and typed in shown[:-len(typed)]


class InteractiveGate:
    def __init__(self, session: Session, engine: ApprovalEngine, cols: int, rows: int,
                 record_only: bool = False) -> None:
        self.session = session
        self.engine = engine
        # No rule concerns this session: nothing is held, each line is only indexed.
        self.record_only = record_only
        self.det = CommandDetector(cols, rows)
        self.editor = LineEditor()
        self.waiting = False
        self.last_key = 0.0
        self._queue = bytearray()
        self._task: asyncio.Task[None] | None = None
        self._in_paste = False
        self._hidden = False
        self._dropped = 0
        self._interrupted = False
        self._output = asyncio.Event()
        # Ends of input (EOF, stdin closed) that arrived while an Enter was held: they go
        # upstream after the held input, or the target would never get that Enter.
        self._after_drain: list[Callable[[], None]] = []
        self._prefix = b""  # an unfinished prefix key (ESC, Ctrl-X) that ended the last input
        self.history: list[str] = []  # lines that went to the shell (for history expansion)
        self._pending = ""  # the lines so far of a logical command the shell has not run yet
        self._abort = False

    # -- from the front door, through the Session ---------------------------------------------

    def output(self, data: bytes) -> None:
        self.det.output(data)
        self._output.set()

    def resize(self, cols: int, rows: int) -> None:
        self.det.resize(cols, rows)

    def drop(self, data: bytes) -> None:
        """Input while a request waits: dropped, but Ctrl-C cancels the request."""
        if b"\x03" in data:
            self.session.cancel_approval("cancelled with Ctrl-C")
        self._dropped += len(data) - data.count(b"\x03")

    def input(self, data: bytes, hidden: bool = False) -> bytes:
        """Keys from the agent; returns what goes upstream now (the rest is held)."""
        if self.record_only:
            self._note(data, hidden)
            return data
        if self._task is not None:  # an Enter is held: keep order behind it
            if b"\x03" in data:
                self._interrupted = True
                self._queue.clear()
                return b""
            self._queue += data
            return b""
        i = self._find_enter(data)
        if i < 0:
            self._keys(data)
            return data
        head = data[:i]
        self._keys(head)
        self._queue += data[i:]
        self._hidden = hidden
        self._task = asyncio.create_task(self._drain(), name=f"approval-gate-{self.session.id}")
        return head

    def _note(self, data: bytes, hidden: bool) -> None:
        """Record-only: each line that runs goes to the commands index as it is sent."""
        pos = 0
        while pos < len(data):
            found = self._find_stop(data[pos:])
            if found is None:
                self._keys(data[pos:])
                return
            i, j, kind = found
            self._keys(data[pos:pos + i])
            key = data[pos + i:pos + j]
            if kind is Key.ENTER or key == b"\x0f":
                self._index_line(hidden)
            else:
                self._keys(key)
            pos += j

    def _index_line(self, hidden: bool) -> None:
        typed = self.editor.line()
        screen = ""
        if self.det.boundary is not None and not self.det.alt_screen:
            screen = _SEARCH_PROMPT.sub("", self.det.command())
        line = screen or ("" if hidden else typed)
        self.det.enter()
        self.editor.clear()
        if not line or self.det.alt_screen:
            return
        logical = self._pending + line
        text = logical + "\n"
        self._pending = text if command_end(text) < 0 and len(text) < _MAX_PENDING else ""
        if not self._pending:
            self.engine.index_command(self.session, logical, "interactive")

    def after_held_input(self, action: Callable[[], None]) -> None:
        """Run ``action`` now, or once the held input has gone upstream (or was refused)."""
        if self._task is None:
            action()
        else:
            self._after_drain.append(action)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- internals ---------------------------------------------------------------------------

    def _find_enter(self, data: bytes | bytearray) -> int:
        """Index of the first key outside a bracketed paste that is not pure editing (an
        Enter, or a key that may run the line: bastion/approvals/keys.py), or -1."""
        found = self._find_stop(data)
        return found[0] if found else -1

    def _find_stop(self, data: bytes | bytearray) -> tuple[int, int, Key] | None:
        in_paste = self._in_paste
        pos = 0
        while True:
            mark = _PASTE_MARK.search(data, pos)
            stop = mark.start() if mark else len(data)
            if not in_paste:
                found = first_stop(data[pos:stop], self._prefix if pos == 0 else b"")
                if found:
                    return found[0] + pos, found[1] + pos, found[2]
            if mark is None:
                return None
            in_paste = mark.group(1) == b"0"
            pos = mark.end()

    def _keys(self, data: bytes, send: bool = False) -> None:
        if not data:
            return
        for mark in _PASTE_MARK.finditer(data):
            self._in_paste = mark.group(1) == b"0"
        if b"\x03" in data:  # Ctrl-C: the shell drops the lines it was collecting
            self._pending = ""
        self.det.keys(data)
        self.editor.keys(data)
        self._prefix = b"" if self._in_paste else pending_prefix(data)
        self.last_key = time.monotonic()
        if send:
            self.session.send_upstream(data)

    async def _drain(self) -> None:
        try:
            while self._queue:
                found = self._find_stop(self._queue)
                end, kind = (found[1], found[2]) if found else (1, Key.ENTER)
                enter = bytes(self._queue[:end])
                del self._queue[:end]
                self._prefix = b""
                if kind is Key.EDITOR and self.det.alt_screen:
                    kind = Key.SUBMIT  # vim's ESC v: judged like any key that may run a line
                if kind is Key.EDITOR:
                    allowed, reason = False, ("editing the command line in an editor (Ctrl-X Ctrl-E, vi-mode v) "
                                              "is refused where approval rules apply: guarita could not see "
                                              "what it runs; type the command instead")
                    self.session.marker("command", command=self.session.mask_command(self.editor.line() or self.det.command()),
                                        mode="interactive", outcome="refused", rule=None, request=None,
                                        reason=reason)
                else:
                    # Enter and Ctrl-O run the line; other keys may (a key bound to accept-line).
                    runs = kind is Key.ENTER or enter == b"\x0f"
                    allowed, reason = await self._decide(record=runs)
                    if runs or not allowed:
                        self.det.enter()
                        self.editor.clear()
                if allowed:
                    self.session.send_upstream(enter)
                else:
                    self.det.enter()
                    self.editor.clear()
                    await self._refuse(reason)  # what was queued then is new input
                # The keys up to the next Enter go on; the queue starts with that Enter again.
                i = self._find_enter(self._queue)
                chunk = bytes(self._queue if i < 0 else self._queue[:i])
                del self._queue[:len(chunk)]
                self._keys(chunk, send=True)
        finally:
            self._task = None
            actions, self._after_drain = self._after_drain, []
            for action in actions:
                with contextlib.suppress(Exception):  # the session may be ending
                    action()

    async def _decide(self, record: bool = True) -> tuple[bool, str]:
        hidden, self._hidden = self._hidden, False
        typed = self.editor.line()
        if self.det.boundary is None and not typed:
            return True, ""  # an empty line
        if self.det.alt_screen:
            # A full-screen program (or tmux, screen): the typed line is judged, never waved
            # through; it is not a shell command line for the index unless held.
            return await self._judge(typed, (), hidden=hidden, record=False)
        await self._settle(typed)
        if self._interrupted:
            self._interrupted = False
            return False, "cancelled with Ctrl-C before the command was sent"
        if self.det.alt_screen:
            return await self._judge(typed, (), hidden=hidden, record=False)
        screen = self.det.command()
        if not screen and not typed:
            return True, ""
        fragment: tuple[str, ...] = ()
        if not hidden and (_within(screen, typed) or _typed_ahead(screen, typed, self.det.blind)):
            # What the screen shows is not the line the shell got, and the typed line is:
            # judge the typed line, and the screen's text as well (the strictest wins).
            screen, fragment = typed, (screen,)
        if self.det.cut_off and not typed:
            # Recalled (nothing typed) and not readable whole: its start is off the screen,
            # and a rule could match there. Fail closed rather than judge a fragment.
            reason = ("the command line does not fit on the screen, so guarita cannot read it whole; "
                      "type it again, shorter, or enlarge the terminal")
            self.session.marker("command", command=self.session.mask_command(screen), mode="interactive",
                                outcome="refused", rule=None,
                                request=None, reason=reason)
            return False, reason
        # The typed text is always judged too (a background job may have drawn the screen's
        # line); when the terminal did not echo (a password), it is checked but never
        # recorded unless it matches.
        also = ((typed,) if typed and typed != screen else ()) + fragment
        screen = _SEARCH_PROMPT.sub("", screen)  # bash runs the line found, not its search prompt
        # The logical command: the lines before it that the shell has not run yet (a backslash
        # continuation, a here-document, an open if/for/while or quote) joined with it.
        logical = self._pending + screen if self._pending else screen
        if logical != screen:
            also = (*also, screen)
        allowed, reason = await self._judge(logical, also, hidden=hidden, record=record, shown=screen)
        if allowed and record and not hidden:
            text = logical + "\n"
            self._pending = text if command_end(text) < 0 and len(text) < _MAX_PENDING else ""
            self.history.append(logical)
        elif not allowed:
            # The shell still collects the earlier lines: Ctrl-C, not a line clear, drops them.
            self._abort, self._pending = bool(self._pending), ""
        return allowed, reason

    async def _judge(self, command: str, also: tuple[str, ...], *, hidden: bool, record: bool,
                     shown: str | None = None) -> tuple[bool, str]:
        """Decide one line (``command``, with other spellings ``also``): refused outright when
        guarita cannot tell what it runs (bastion/approvals/unsure.py), else by the rules."""
        if not command and not also:
            return True, ""
        for text in (command, *also):
            expanded = expand_history(text, self.history)
            reason: str | None = None
            if expanded is None:
                reason = ("the line uses history expansion that guarita cannot follow; "
                          "type the command in full")
            else:
                if expanded != text:
                    also = (*also, expanded)
                reason = why_unsure(text)
            if reason:
                self.session.marker("command", command=self.session.mask_command(command or text), mode="interactive",
                                    outcome="refused",
                                    rule=None, request=None, reason=reason)
                return False, reason
        self.waiting = True
        self._dropped = 0
        try:
            result = await self.engine.check(self.session, command, "interactive", also=also,
                                             record=record and not (hidden and not (shown or command)))
        finally:
            self.waiting = False
            if self._dropped:
                self.session.marker("input-dropped", length=self._dropped,
                                    reason="typed while a command waited for approval")
        if result.allowed:
            if result.outcome == "approved":
                self.session.say(f"guarita: {result.reason}")
            return True, ""
        return False, result.reason

    async def _settle(self, typed: str) -> bool:
        """Wait until the echo of what was typed has arrived (see QUIET, MAX_SETTLE)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_SETTLE
        while True:
            last_output = self.det.last_output
            if last_output > self.last_key:
                shown = self.det.command()
                if typed and shown.endswith(typed):
                    return True
                # Quiet after some output is enough, unless what is shown is only the start
                # of what was typed: then the rest of the echo is still coming.
                if time.monotonic() - last_output >= QUIET and not _lagging(shown, typed):
                    return True
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            self._output.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._output.wait(), min(remaining, QUIET))

    async def _refuse(self, reason: str) -> None:
        """Clear the remote line, tell the user why, drop the rest of a paste, show a prompt."""
        discarded = len(self._queue)
        self._queue.clear()
        abort, self._abort = self._abort, False
        if abort:  # the shell prints a fresh prompt after Ctrl-C: read it as one
            self.det.enter()
        self.session.send_upstream(b"\x03" if abort else CLEAR_LINE)
        tail = f" ({discarded} bytes typed or pasted after it were discarded)" if discarded else ""
        self.session.say(f"guarita: {reason}{tail}")
        # Let the shell erase its line (on the row under the message), then show its prompt
        # again there: the shell and the user's terminal agree on the cursor once more.
        sent = time.monotonic()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + MAX_SETTLE
        while loop.time() < deadline:
            if self.det.last_output > sent and time.monotonic() - self.det.last_output >= QUIET:
                break
            self._output.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._output.wait(), QUIET)
        self.editor.clear()
        if abort:
            return
        self.det.enter()
        if self.det.last_prompt:
            self.session.to_client(b"\r" + self.det.last_prompt.encode())
