"""Where a logical shell command ends in a stream of shell input (POSIX sh / bash syntax).

The line discipline of a shell without a terminal (bastion/approvals/linediscipline.py)
forwards input one logical command at a time. A command ends at a newline that is outside
quotes (``'…'``, ``"…"``, ``$'…'``, backquotes, ``$(…)``), not escaped by a backslash,
not after an operator that needs more (``&&``, ``||``, ``|``), outside compound commands
(``if…fi``, ``case…esac``, ``for/while/until/select…done``, ``{…}``, ``(…)``), and after the
bodies of any here-documents it opened. Keywords count only in command position, as the
shell reads them (``echo if`` opens nothing).

The scanner never has to be right about the meaning, only about the boundary: a mistake
that joins too much holds more text together (judged whole), one that splits too early is
what the tests guard against.
"""

from __future__ import annotations

_OPEN = {"if": "fi", "case": "esac", "for": "done", "while": "done", "until": "done", "select": "done", "{": "}"}
_CLOSE = {"fi", "esac", "done", "}"}
# After these words the next word is again in command position.
_LEAD = {"then", "do", "else", "elif", "!", "{", "if", "while", "until", "time", "in_case"}
_WORD_END = set(" \t\n;&|()<>")


def command_end(text: str, start: int = 0) -> int:
    """The index just past the first complete logical command of ``text[start:]`` (past
    its newline), or -1 when it holds no complete command yet."""
    return _Scanner(text, start).run()


class _Scanner:
    def __init__(self, text: str, start: int = 0) -> None:
        self.t = text
        self.i = start
        self.ctx: list[str] = []  # "'", '"', "$'", "`", "$(" (nesting inside words)
        self.blocks: list[str] = []  # the closing word of each open compound command
        self.parens = 0
        self.word = ""
        self.word_quoted = False
        self.cmd_pos = True
        self.needs_more = False  # the last token was && || | (or a lone `!`)
        self.heredocs: list[tuple[str, bool]] = []  # (delimiter, strip tabs)

    def run(self) -> int:
        t = self.t
        n = len(t)
        while self.i < n:
            c = t[self.i]
            top = self.ctx[-1] if self.ctx else ""
            if top == "'":
                if c == "'":
                    self.ctx.pop()
                self.i += 1
                continue
            if c == "\\":
                if top in ("", "$(") and t.startswith("\\\n", self.i):
                    self.i += 2  # a line continuation: no break
                    continue
                self.word += t[self.i:self.i + 2]
                self.i += 2
                continue
            if top == "$'":
                if c == "'":
                    self.ctx.pop()
                self.i += 1
                continue
            if top == '"':
                if c == '"':
                    self.ctx.pop()
                elif c == "`":
                    self.ctx.append("`")
                elif t.startswith("$(", self.i):
                    self.ctx.append("$(")
                    self.i += 1
                self.i += 1
                continue
            if top == "`":
                if c == "`":
                    self.ctx.pop()
                self.i += 1
                continue
            end = self._top(c)
            if end >= 0:
                return end
        return -1

    def _top(self, c: str) -> int:
        """One character outside quotes (at the top or inside ``$(…)``)."""
        t, i = self.t, self.i
        if c in ("'", '"', "`"):
            self.ctx.append(c)
            self.word_quoted = True
            self.word += c
        elif t.startswith("$'", i):
            self.ctx.append("$'")
            self.word += "$'"
            self.i += 1
        elif t.startswith("$(", i):
            self.ctx.append("$(")
            self.word += "$("
            self.i += 1
        elif c == "#" and not self.word:
            nl = t.find("\n", i)
            self.i = (nl if nl >= 0 else len(t))
            return -1
        elif c == ")" and self.ctx and self.ctx[-1] == "$(":
            self.ctx.pop()
            self.word += c
        elif c in _WORD_END:
            self._end_word()
            return self._operator(c)
        else:
            self.word += c
        self.i += 1
        return -1

    def _operator(self, c: str) -> int:
        t, i = self.t, self.i
        if self.ctx:  # inside $(…): only its nesting matters, not command boundaries
            self.i += 1
            return -1
        if t.startswith("<<<", i):  # a here-string: no body follows
            self.i += 3
            return -1
        if c == "<" and t.startswith("<<", i):
            self.i = self._heredoc_start(i + 2)
            return -1
        if c in "&|":
            two = t[i:i + 2]
            self.needs_more = two in ("&&", "||") or (c == "|")
            self.i += 2 if two in ("&&", "||", "|&", ";&") else 1
            self.cmd_pos = True
            return -1
        if c == ";":
            self.cmd_pos = True
            self.needs_more = False
        elif c == "(":
            self.parens += 1
            self.cmd_pos = True
        elif c == ")":
            if self.blocks and self.blocks[-1] == "esac":
                pass  # a case pattern's closing parenthesis
            else:
                self.parens = max(self.parens - 1, 0)
            self.cmd_pos = True
        elif c == "\n":
            self.i += 1
            if self.heredocs:
                end = self._heredoc_bodies(self.i)
                if end < 0:
                    return self._incomplete()
                self.i = end
            if not self.needs_more and not self.blocks and not self.parens:
                return self.i
            self.cmd_pos = True
            return -1
        self.i += 1
        return -1

    def _incomplete(self) -> int:
        self.i = len(self.t)
        return -1

    def _end_word(self) -> None:
        word, quoted = self.word, self.word_quoted
        self.word, self.word_quoted = "", False
        if not word:
            return
        self.needs_more = False
        if quoted or not self.cmd_pos:
            self.cmd_pos = False
            return
        if word in _OPEN:
            self.blocks.append(_OPEN[word])
        elif word in _CLOSE and self.blocks and self.blocks[-1] == word:
            self.blocks.pop()
        elif word == "in" and self.blocks and self.blocks[-1] == "esac":
            pass
        self.cmd_pos = word in _LEAD or word in _OPEN and word != "case" and word != "for" and word != "select"

    def _heredoc_start(self, j: int) -> int:
        t = self.t
        strip = t.startswith("-", j)
        j += 1 if strip else 0
        while j < len(t) and t[j] in " \t":
            j += 1
        k = j
        word = ""
        quote = ""
        while k < len(t) and (quote or t[k] not in _WORD_END):
            ch = t[k]
            if quote:
                if ch == quote:
                    quote = ""
                else:
                    word += ch
            elif ch in ("'", '"'):
                quote = ch
            elif ch == "\\":
                word += t[k + 1:k + 2]
                k += 1
            else:
                word += ch
            k += 1
        if word:
            self.heredocs.append((word, strip))
        self.cmd_pos = False
        return k

    def _heredoc_bodies(self, j: int) -> int:
        t = self.t
        for delimiter, strip in self.heredocs:
            while True:
                nl = t.find("\n", j)
                if nl < 0:
                    return -1
                line = t[j:nl]
                j = nl + 1
                if (line.lstrip("\t") if strip else line) == delimiter:
                    break
        self.heredocs.clear()
        return j


def split_commands(text: str) -> tuple[list[str], str]:
    """The complete logical commands at the start of ``text``, and the rest."""
    out: list[str] = []
    pos = 0
    while True:
        end = command_end(text, pos)
        if end < 0:
            return out, text[pos:]
        out.append(text[pos:end])
        pos = end
