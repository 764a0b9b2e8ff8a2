"""The approval gate of a shell without a terminal: guarita is its line discipline.

Without a PTY there is no echo to read (``echo 'rm -rf /data' | ssh target``, a script
piped into ``ssh target bash``, ``ssh -T target`` and typing). The gate then holds the
agent's input and forwards it one *logical command* at a time
(bastion/approvals/shellscan.py: continuations, here-documents, quotes and compound
commands joined), each judged like an exec command, in order. A command that needs
approval waits, and everything after it waits behind it. When one is refused (denied,
timed out, cancelled, not approved), the shell's input ends there: the rest of the input
(and anything sent later) is discarded and the shell gets end-of-file when the agent's
input ends, because the lines of a script depend on each
other (``cd /x || exit`` then ``rm -rf *``), so running the rest without the refused line
could do worse than running none of it. The agent is told why on stderr.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING

from bastion.approvals.shellscan import command_end

if TYPE_CHECKING:
    from bastion.approvals.engine import ApprovalEngine
    from bastion.session import Session

# Compact the pending text once this much of it has been forwarded.
_COMPACT = 64 * 1024


class LineGate:
    """The same face as InteractiveGate, for bastion/session.py."""

    def __init__(self, session: Session, engine: ApprovalEngine) -> None:
        self.session = session
        self.engine = engine
        self.waiting = False  # input is never dropped here: it queues behind the held command
        self._decoder = codecs.getincrementaldecoder("utf-8")("surrogateescape")
        self._text = ""
        self._pos = 0
        self._task: asyncio.Task[None] | None = None
        self._eof = False
        self._refused = False
        self._after: list[Callable[[], None]] = []

    # -- from bastion/session.py ------------------------------------------------------------

    def input(self, data: bytes, hidden: bool = False) -> bytes:
        """Agent input: nothing goes upstream at once; commands go when judged."""
        if self._refused:
            return b""
        self._text += self._decoder.decode(data)
        self._kick()
        return b""

    def output(self, data: bytes) -> None:
        pass

    def resize(self, cols: int, rows: int) -> None:
        pass

    def drop(self, data: bytes) -> None:
        pass

    def after_held_input(self, action: Callable[[], None]) -> None:
        """End of input: the last (unterminated) command is judged, then ``action`` runs."""
        self._eof = True
        self._text += self._decoder.decode(b"", final=True)
        self._after.append(action)
        self._kick()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task

    # -- internals ---------------------------------------------------------------------------

    def _kick(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._drain(), name=f"line-gate-{self.session.id}")

    def _next(self) -> str | None:
        end = command_end(self._text, self._pos)
        if end < 0:
            if not self._eof or self._pos >= len(self._text):
                return None
            end = len(self._text)  # the end of input ends the last command too
        command = self._text[self._pos:end]
        self._pos = end
        if self._pos > _COMPACT:
            self._text, self._pos = self._text[self._pos:], 0
        return command

    async def _drain(self) -> None:
        try:
            while not self._refused:
                command = self._next()
                if command is None:
                    break
                if command.strip() and not await self._allowed(command):
                    self._refuse()
                    break
                self.session.send_upstream(command.encode("utf-8", "surrogateescape"))
        finally:
            self._task = None
            if self._eof or self._refused:
                self._finish()

    async def _allowed(self, command: str) -> bool:
        shown = command.rstrip("\n")
        self.waiting = False
        result = await self.engine.check(self.session, shown, "interactive")
        if result.allowed and result.outcome == "approved":
            self.session.say(f"guarita: {result.reason}")
        if not result.allowed:
            self.session.say(f"guarita: {result.reason}")
        return result.allowed

    def _refuse(self) -> None:
        rest = len(self._text) - self._pos
        self._refused = True
        self._text, self._pos = "", 0
        self.session.say("guarita: the shell's input ends here" +
                         (f" ({rest} characters after the refused command were discarded)" if rest else ""))
        self.session.marker("input-dropped", length=rest, reason="after a refused command, without a terminal")

    def _finish(self) -> None:
        if self._eof and self._pos < len(self._text) and not self._refused:
            self._kick()  # more came in while the last command was judged
            return
        actions, self._after = self._after, []
        for action in actions:
            with contextlib.suppress(Exception):  # the session may be ending
                action()


_SHELLS = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh", "busybox", "su", "rbash", "fish"}


def line_gate(session: Session, approvals: ApprovalEngine) -> LineGate | None:
    """The gate of a session without a terminal, or None when its input is no commands
    (an exec of a program that does not read a script from stdin)."""
    if not reads_commands(session.info.kind, session.info.command):
        return None
    return LineGate(session, approvals)


def reads_commands(kind: str, command: str | None) -> bool:
    """Whether the agent's input of a session without a terminal is shell commands: a
    shell, or an exec of a shell that reads its script from stdin (no ``-c``)."""
    if kind == "shell":
        return True
    if kind != "exec" or not command:
        return False
    from bastion.approvals.rules import _simple_commands  # the same unwrapping as the rules

    for argv in _simple_commands(command):
        name = argv[0].rsplit("/", 1)[-1]
        if name in _SHELLS and ("-c" not in argv[1:] or "-s" in argv[1:]):
            return True
    return False
