"""What a key does to a shell's command line, as far as the approval gate must know.

The gate lets *pure editing* keys through at once (they change the line on screen, and the
screen is read when the line is judged). Every other key may run the line (Enter, Ctrl-J,
Ctrl-O operate-and-get-next, a key bound to accept-line) and is treated like Enter: the
line is judged before the key goes on. A few keys open the line in an editor whose result
the shell runs unseen (Ctrl-X Ctrl-E, vi-mode ``v``); outside a full-screen program they
are refused. The set of editing keys is bash's and zsh's default emacs bindings: anything
not in it, including keys this module does not know, counts as "may run the line".
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterator


class Key(enum.Enum):
    EDIT = "edit"  # changes the line only
    ENTER = "enter"  # runs the line (CR, LF)
    SUBMIT = "submit"  # may run the line: judged like Enter
    EDITOR = "editor"  # opens the line in an editor whose result runs unseen


# Control bytes of pure line editing in readline/zle's emacs keymap: Ctrl-@ A B C D E F G H
# Tab K L N P R S T U V W Y Z \\ ] ^ _ and DEL. Not here: Ctrl-J/M (Enter), Ctrl-O
# (operate-and-get-next), Ctrl-Q, Ctrl-X (a prefix: Ctrl-X Ctrl-E edits in an editor).
_EDIT_CONTROLS = frozenset(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0b\x0c\x0e\x10\x12\x13\x14\x15\x16\x17"
                           b"\x19\x1a\x1c\x1d\x1e\x1f\x7f")
# CSI keys that edit: arrows, Home/End, Insert/Delete/PgUp/PgDn (with modifiers), paste marks.
_CSI_EDIT = re.compile(rb"\x1b\[(?:[0-9;]*[ABCDHF]|[1-8](?:;[0-9]+)?~|20[01]~)")
_CSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]")
_SS3 = re.compile(rb"\x1bO.")
_SS3_EDIT = re.compile(rb"\x1bO[ABCDHF]")
# Meta (Alt) keys of readline/zle that edit: words, case, transpose, yank, undo, revert,
# history search by prefix, comment-out (M-# runs a comment: nothing).
_META_EDIT = frozenset(b"bfdctluyr.<>_#?*\\ \x7f\x08\x1b")


def keys(data: bytes) -> Iterator[tuple[int, int, Key]]:
    """(start, end, kind) of each key in ``data``; printable text comes as one EDIT run."""
    i, n = 0, len(data)
    while i < n:
        b = data[i]
        if b >= 0x20 and b != 0x7f and b != 0x1b:
            j = i + 1
            while j < n and data[j] >= 0x20 and data[j] not in (0x7f, 0x1b):
                j += 1
            yield i, j, Key.EDIT
            i = j
        elif b in (0x0d, 0x0a):
            yield i, i + 1, Key.ENTER
            i += 1
        elif b == 0x1b:
            end, kind = _escape(data, i)
            yield i, end, kind
            i = end
        elif b == 0x18:  # Ctrl-X prefix
            if i + 1 < n and data[i + 1] in (0x05, 0x65):  # Ctrl-X Ctrl-E / Ctrl-X e (edit-and-execute)
                yield i, i + 2, Key.EDITOR
                i += 2
            else:
                yield i, i + 1, Key.SUBMIT
                i += 1
        else:
            yield i, i + 1, Key.EDIT if b in _EDIT_CONTROLS else Key.SUBMIT
            i += 1


def _escape(data: bytes, i: int) -> tuple[int, Key]:
    if i + 1 >= len(data):
        return i + 1, Key.EDIT  # a lone ESC: a prefix (emacs) or command mode (vi), see the gate
    nxt = data[i + 1]
    if nxt == ord("["):
        m = _CSI.match(data, i)
        if m is None:
            return len(data), Key.SUBMIT
        return m.end(), Key.EDIT if _CSI_EDIT.fullmatch(m.group(0)) else Key.SUBMIT
    if nxt == ord("O"):
        m = _SS3.match(data, i)
        if m is None:
            return len(data), Key.SUBMIT
        return m.end(), Key.EDIT if _SS3_EDIT.fullmatch(m.group(0)) else Key.SUBMIT
    if nxt in (ord("v"), ord("V")):  # vi command mode `v`, or M-v: edit-and-execute in vi mode
        return i + 2, Key.EDITOR
    return i + 2, Key.EDIT if nxt in _META_EDIT or chr(nxt).isdigit() else Key.SUBMIT


def first_stop(data: bytes | bytearray, prev: bytes = b"") -> tuple[int, int, Key] | None:
    """The first key of ``data`` that is not pure editing, or None. ``prev``: the end of
    the previous chunk when it was an unfinished prefix (a lone ESC or Ctrl-X, typed key by
    key); offsets are into ``data``."""
    raw = prev + bytes(data)
    for start, end, kind in keys(raw):
        if kind is not Key.EDIT and end > len(prev):
            return max(start - len(prev), 0), end - len(prev), kind
    return None


def pending_prefix(data: bytes | bytearray) -> bytes:
    """The unfinished prefix key that ``data`` ends with (see first_stop), or b""."""
    return bytes(data[-1:]) if data[-1:] in (b"\x1b", b"\x18") else b""
