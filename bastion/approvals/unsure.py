"""Lines whose effect the approval gate cannot know from their text, in a terminal shell.

* History expansion (``!!``, ``!$``, ``!-2``, ``!rm``, ``^a^b``): bash replaces it before
  running the line. :func:`expand_history` replays it against the lines the gate has seen
  go to the shell; a designator it cannot follow (no such line seen: the target's history
  file, an absolute event number, a modifier) makes the line unknowable, and it is refused.
* Lines that change what keys do (``bind``, zsh's ``bindkey``, ``set -o vi``, an inputrc):
  a bound key can type and run a line the gate never sees as typed; refused.
* ``fc`` without ``-l``: it edits or re-runs history lines unseen; refused.

The principle (docs/decisions.md): when the gateway cannot be sure what will run, it holds.
"""

from __future__ import annotations

import re

_REBIND = re.compile(r"(?:^|[\s;&|(`{])(?:bind\s+(?!-[pPlvVsSqf]*\s*(?:$|[;&|)]))|bindkey\b|set\s+-o\s*vi\b|"
                     r"set\s+-o\s*emacs\b|INPUTRC\b|inputrc\b|editing-mode\b)")
_FC = re.compile(r"(?:^|[\s;&|(`{])fc\b(?!\s+-l)")
# A history designator: `!` not followed by a blank, `=`, `(`, or the end (bash's rule).
_DESIGNATOR = re.compile(r"!(?P<ev>!|-?\d+|\?[^?\n]*\??|[^\s=(!\d?$^*:\"'-][^\s;&|()<>:\"'$]*)?"
                         r"(?P<w>[$^*]|:[\d$^*x%-]+)?(?P<mod>(?::[a-zA-Z&][^\s:]*)*)")


def why_unsure(line: str) -> str | None:
    """Why guarita cannot know what ``line`` runs from its text, or None."""
    if _REBIND.search(line):
        return ("changing key bindings (bind, bindkey, set -o vi, inputrc) is refused where approval rules apply: "
                "a bound key could run a line guarita does not see")
    if _FC.search(line):
        return "fc (edit or re-run history) is refused where approval rules apply: guarita could not see what it runs"
    return None


def expand_history(line: str, history: list[str]) -> str | None:
    """``line`` after bash's history expansion against ``history`` (oldest first); the line
    itself when it has none; None when it has one that cannot be followed."""
    if "!" not in line and not line.startswith("^"):
        return line
    if line.startswith("^"):
        parts = line[1:].split("^")
        if not history or len(parts) < 2 or parts[0] not in history[-1]:
            return None
        return history[-1].replace(parts[0], parts[1], 1)
    out: list[str] = []
    i = 0
    quote = ""
    while i < len(line):
        c = line[i]
        if c == "\\" and quote != "'":
            out.append(line[i:i + 2])
            i += 2
            continue
        if c == "'" and quote != '"':
            quote = "" if quote == "'" else "'"
        elif c == '"' and quote != "'":
            quote = "" if quote == '"' else '"'
        elif c == "!" and quote != "'":
            m = _DESIGNATOR.match(line, i)
            if m and (m.group("ev") or m.group("w")) and not (quote == '"' and line[i + 1:i + 2] == '"'):
                word = _designate(m, history)
                if word is None:
                    return None
                out.append(word)
                i = m.end()
                continue
        out.append(c)
        i += 1
    return "".join(out)


def _designate(m: re.Match[str], history: list[str]) -> str | None:
    if m.group("mod"):  # a modifier (:s/a/b/, :h, :p ...): not followed
        return None
    ev, sel = m.group("ev"), m.group("w")
    if ev is None or ev == "!":
        event = history[-1] if history else None
    elif ev.lstrip("-").isdigit():
        n = int(ev[1:]) if ev.startswith("-") else 0
        event = history[-n] if 0 < n <= len(history) else None  # absolute numbers: the target's
    elif ev.startswith("?"):
        needle = ev[1:].rstrip("?")
        event = next((h for h in reversed(history) if needle in h), None)
    else:
        event = next((h for h in reversed(history) if h.startswith(ev)), None)
    if event is None:
        return None
    if not sel:
        return event
    return _words(sel.lstrip(":"), event.split())


def _words(sel: str, words: list[str]) -> str | None:
    last = len(words) - 1
    if sel == "*":
        return " ".join(words[1:])
    ends = {"^": 1, "$": last}
    m = re.fullmatch(r"(\^|\$|\d+)?(?:-(\^|\$|\d+)?)?", sel)
    if not m or not words:
        return None
    a = ends[m.group(1)] if m.group(1) in ends else int(m.group(1) or 0)
    if "-" not in sel:
        return words[a] if 0 <= a <= last else None
    b = ends[m.group(2)] if m.group(2) in ends else (int(m.group(2)) if m.group(2) else last - 1)
    if not (0 <= a <= b <= last):
        return None
    return " ".join(words[a:b + 1])
