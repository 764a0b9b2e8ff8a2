"""Approval rules: an ordered list from the config; the first rule that matches decides.

A rule is either a *command* rule (``pattern``, a regex searched in the command, or
``argv_prefix``, a list compared with the start of each simple command) or a *shell* rule
(``shell = "allow" | "approve" | "deny"``: may this identity open an interactive shell at
all). Its scope narrows where it applies: who (``subjects``, ``groups``, ``claims``: any of
them, as in access rules) and where (``targets`` for SSH, ``clusters`` and ``namespaces``
for Kubernetes). ``action`` is ``allow``, ``deny`` or ``approve`` (with ``approvers``,
``min_approvals``, ``timeout``). When no rule matches, ``[approval_defaults]`` decides.

Matching is done on the command as sent (SSH exec string, kubectl exec argv joined with
shell quoting) and on two normalised forms (Unicode NFKC; shell words re-joined, which
removes quotes and repeated blanks), so trivial respellings match too. What command
matching cannot stop is written down in docs/threat-model.md.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Protocol

from bastion.identity import Identity
from bastion.identity.delegation import DELEGATION_KEYS, DelegationScope, parse_scope
from bastion.who import matches_identity


class _Reader(Protocol):
    """What the rules' parser uses of the config's table reader (bastion.config._Reader)."""

    problems: list[tuple[str, str]]

    def get(self, table: dict[str, Any], key: str, path: str, kind: type | tuple[type, ...],
            default: Any = None, required: bool = False) -> Any: ...

    def strings(self, table: dict[str, Any], key: str, path: str,
                default: tuple[str, ...] = ()) -> tuple[str, ...]: ...

    def duration(self, table: dict[str, Any], key: str, path: str, default: float) -> float: ...

    def unknown(self, table: dict[str, Any], known: set[str], path: str) -> None: ...

ACTIONS = ("allow", "deny", "approve")
DEFAULT_TIMEOUT = 600.0
DEFAULT_REQUESTS_PER_MINUTE = 5


@dataclass(frozen=True)
class ApprovalRule:
    name: str
    action: str
    pattern: re.Pattern[str] | None = None
    argv_prefix: tuple[str, ...] | None = None
    shell: bool = False  # a rule about opening an interactive shell (action from `shell = ...`)
    subjects: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    claims: tuple[tuple[str, str], ...] = ()
    targets: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    namespaces: tuple[str, ...] = ()
    approvers: tuple[str, ...] = ()
    min_approvals: int = 1
    timeout: float = DEFAULT_TIMEOUT
    message: str | None = None
    # Delegated tokens (RFC 8693 `act`): `delegated`, `actors`, `max_delegation_depth`.
    delegation: DelegationScope = field(default_factory=DelegationScope)

    def in_scope(self, ctx: Context) -> bool:
        if (self.subjects or self.groups or self.claims) and not _who(self, ctx.identity):
            return False
        if self.delegation and not self.delegation.matches(ctx.identity):
            return False
        if self.targets or self.clusters:
            if ctx.front_door == "kube":
                if not (self.clusters and _any_glob(ctx.target, self.clusters)):
                    return False
            elif not (self.targets and _any_glob(ctx.target, self.targets)):
                return False
        return not (self.namespaces and (ctx.namespace is None or not _any_glob(ctx.namespace, self.namespaces)))

    def matches_command(self, forms: CommandForms) -> bool:
        if self.shell:
            return False
        if self.pattern is not None:
            return any(self.pattern.search(text) for text in forms.texts)
        assert self.argv_prefix is not None
        n = len(self.argv_prefix)
        return any(tuple(argv[:n]) == self.argv_prefix for argv in forms.simple_commands)


@dataclass(frozen=True)
class ApprovalDefaults:
    action: str = "allow"
    shell: str = "allow"
    approvers: tuple[str, ...] = ()
    min_approvals: int = 1
    timeout: float = DEFAULT_TIMEOUT
    requests_per_minute: int = DEFAULT_REQUESTS_PER_MINUTE


@dataclass(frozen=True)
class WebhookConfig:
    url: str
    format: str = "json"  # or "slack"
    timeout: float = 5.0


@dataclass(frozen=True)
class ApprovalPolicy:
    rules: tuple[ApprovalRule, ...] = ()
    defaults: ApprovalDefaults = field(default_factory=ApprovalDefaults)
    webhooks: tuple[WebhookConfig, ...] = ()

    def command_verdict(self, ctx: Context, command: str, argv: list[str] | None = None) -> Verdict:
        forms = CommandForms.of(command, argv)
        for rule in self.rules:
            if not rule.shell and rule.in_scope(ctx) and rule.matches_command(forms):
                return Verdict(rule.action, rule)
        return Verdict(self.defaults.action, None)

    def shell_verdict(self, ctx: Context) -> Verdict:
        for rule in self.rules:
            if rule.shell and rule.in_scope(ctx):
                return Verdict(rule.action, rule)
        return Verdict(self.defaults.shell, None)

    def watches_commands(self, ctx: Context) -> bool:
        """Whether any command could need a decision in this session (else no detector)."""
        if self.defaults.action != "allow":
            return True
        return any(not r.shell and r.action != "allow" and r.in_scope(ctx) for r in self.rules)

    def approvers_for(self, rule: ApprovalRule | None) -> tuple[str, ...]:
        return (rule.approvers if rule else ()) or self.defaults.approvers


@dataclass(frozen=True)
class Context:
    """Where a command runs: who, through which door, on what."""

    identity: Identity
    front_door: str  # "ssh" or "kube"
    target: str  # SSH target name or Kubernetes cluster
    namespace: str | None = None


@dataclass(frozen=True)
class Verdict:
    action: str  # allow | deny | approve
    rule: ApprovalRule | None

    @property
    def rule_name(self) -> str:
        return self.rule.name if self.rule else "approval_defaults"


@dataclass(frozen=True)
class CommandForms:
    """The spellings of one command that rules are matched against."""

    texts: tuple[str, ...]
    simple_commands: tuple[tuple[str, ...], ...]

    @classmethod
    def of(cls, command: str, argv: list[str] | None = None, depth: int = 0) -> CommandForms:
        texts = [command]
        if "\\\n" in command:  # a backslash-newline is no break to the shell
            command = command.replace("\\\n", "")
            texts.append(command)
        if "$'" in command:  # ANSI-C quoting: $'\x72m' is 'rm'
            command = _ANSI_C.sub(lambda m: shlex.quote(_ansi_c(m.group(1))), command)
            texts.append(command)
        nfkc = unicodedata.normalize("NFKC", command)
        if nfkc != command:
            texts.append(nfkc)
        words = _words(nfkc)
        if words is not None:
            joined = " ".join(words)
            if joined not in texts:
                texts.append(joined)
        simple = _simple_commands(nfkc)
        if argv:
            simple.insert(0, tuple(argv))
        for script in _nested_scripts(simple) if depth < 4 else ():
            inner = cls.of(script, depth=depth + 1)  # sh -c '…', eval '…': judged as the shell will run it
            texts += [t for t in inner.texts if t not in texts]
            simple += inner.simple_commands
        return cls(tuple(texts), tuple(simple))


_ANSI_C = re.compile(r"\$'((?:[^'\\]|\\.)*)'", re.S)
_ANSI_C_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v", "e": "\x1b",
                   "E": "\x1b", "\\": "\\", "'": "'", '"': '"', "?": "?"}
_ANSI_C_CODE = re.compile(r"\\(x[0-9a-fA-F]{1,2}|u[0-9a-fA-F]{1,4}|U[0-9a-fA-F]{1,8}|[0-7]{1,3}|c.|.)", re.S)
_SHELL_NAMES = {"sh", "bash", "dash", "zsh", "ksh", "mksh", "ash", "yash", "posh", "rbash", "busybox"}


def _ansi_c(body: str) -> str:
    """The text of a bash ``$'…'`` string."""
    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code[0] in "xuU":
            try:
                return chr(int(code[1:], 16))
            except (ValueError, OverflowError):
                return code
        if code[0] in "01234567":
            return chr(int(code, 8) & 0xFF)
        if code[0] == "c" and len(code) == 2:
            return chr(ord(code[1].upper()) ^ 0x40)
        return _ANSI_C_ESCAPES.get(code, "\\" + code)
    return _ANSI_C_CODE.sub(one, body)


def _nested_scripts(simple: list[tuple[str, ...]]) -> list[str]:
    """The scripts that simple commands hand to another shell: ``bash -c SCRIPT``,
    ``sh -ec SCRIPT``, ``eval WORDS``."""
    out: list[str] = []
    for argv in simple:
        name = argv[0].rsplit("/", 1)[-1]
        if name == "eval" and len(argv) > 1:
            out.append(" ".join(argv[1:]))
        elif name in _SHELL_NAMES:
            for i, arg in enumerate(argv[1:-1], 1):
                if arg.startswith("-") and not arg.startswith("--") and "c" in arg:
                    out.append(argv[i + 1])
                    break
    return [s for s in dict.fromkeys(out) if s.strip()]


_OPERATORS = {";", "&&", "||", "|", "&", "|&", ";;", "(", ")", "{", "}", "\n"}
_PREFIX_WORDS = {"sudo", "command", "exec", "nohup", "time", "env", "nice", "builtin"}


def _words(command: str) -> list[str] | None:
    try:
        return shlex.split(command, comments=False, posix=True)
    except ValueError:
        return None


def _simple_commands(command: str) -> list[tuple[str, ...]]:
    """Each simple command of a shell line as argv, also without wrappers and paths:
    ``a; sudo /bin/rm -rf x | c`` -> [a], [sudo, /bin/rm, -rf, x], [/bin/rm, -rf, x], [rm, -rf, x], [c]."""
    lexer = shlex.shlex(command, posix=True, punctuation_chars=";&|()\n")
    lexer.whitespace_split = True
    lexer.commenters = ""
    try:
        tokens = list(lexer)
    except ValueError:  # unbalanced quotes: fall back to blanks
        tokens = [t for t in re.split(r"\s+|([;&|()])", command) if t]
    out: list[tuple[str, ...]] = []
    current: list[str] = []
    for token in [*tokens, ";"]:
        if token in _OPERATORS or set(token) <= set(";&|()\n"):
            if current:
                out.extend(_unwrapped(current))
            current = []
        else:
            current.append(token)
    return out


_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def _unwrapped(argv: list[str]) -> list[tuple[str, ...]]:
    forms = [tuple(argv)]
    i = 0
    while i < len(argv) and (argv[i] in _PREFIX_WORDS or _ASSIGNMENT.match(argv[i])):
        i += 1
        while i < len(argv) and argv[i].startswith("-"):
            i += 1
        if i < len(argv):
            forms.append(tuple(argv[i:]))
    for form in list(forms):
        if "/" in form[0]:
            forms.append((form[0].rsplit("/", 1)[1], *form[1:]))
    return forms


def _any_glob(value: str | None, patterns: tuple[str, ...]) -> bool:
    return value is not None and any(fnmatch.fnmatchcase(value, p) for p in patterns)


def _who(rule: ApprovalRule, identity: Identity) -> bool:
    return matches_identity(rule, identity)  # one definition of "who" for access and approvals


def parse_policy(r: _Reader, raw: dict[str, Any]) -> ApprovalPolicy:
    """``[[approvals]]``, ``[approval_defaults]`` and ``[[webhooks]]`` of a config file."""
    defaults = _defaults(r, r.get(raw, "approval_defaults", "", dict, {}))
    rules_raw = raw.get("approvals", [])
    if not isinstance(rules_raw, list) or not all(isinstance(v, dict) for v in rules_raw):
        r.problems.append(("approvals", "must be an array of tables: write [[approvals]]"))
        rules_raw = []
    rules = tuple(_rule(r, t, f"approvals[{i}].", i, defaults) for i, t in enumerate(rules_raw))
    hooks_raw = raw.get("webhooks", [])
    if not isinstance(hooks_raw, list) or not all(isinstance(v, dict) for v in hooks_raw):
        r.problems.append(("webhooks", "must be an array of tables: write [[webhooks]]"))
        hooks_raw = []
    webhooks = tuple(_webhook(r, t, f"webhooks[{i}].") for i, t in enumerate(hooks_raw))
    return ApprovalPolicy(rules=rules, defaults=defaults, webhooks=webhooks)


def _action(r: _Reader, t: dict[str, Any], key: str, p: str, default: str) -> str:
    value = r.get(t, key, p, str, default)
    if value not in ACTIONS:
        r.problems.append((f"{p}{key}", f"must be one of {', '.join(ACTIONS)}, got {value!r}"))
        return default
    return value


def _defaults(r: _Reader, t: dict[str, Any]) -> ApprovalDefaults:
    p = "approval_defaults."
    r.unknown(t, {"action", "shell", "approvers", "min_approvals", "timeout", "requests_per_minute"}, p)
    rpm = r.get(t, "requests_per_minute", p, int, DEFAULT_REQUESTS_PER_MINUTE)
    if rpm < 1:
        r.problems.append((f"{p}requests_per_minute", "must be at least 1"))
    d = ApprovalDefaults(
        action=_action(r, t, "action", p, "allow"),
        shell=_action(r, t, "shell", p, "allow"),
        approvers=r.strings(t, "approvers", p),
        min_approvals=_min_approvals(r, t, p, 1),
        timeout=_timeout(r, t, p, DEFAULT_TIMEOUT),
        requests_per_minute=max(1, rpm),
    )
    if "approve" in (d.action, d.shell) and not d.approvers:
        r.problems.append((f"{p}approvers", "name the approver groups: an 'approve' default needs someone to approve"))
    return d


def _min_approvals(r: _Reader, t: dict[str, Any], p: str, default: int) -> int:
    value = r.get(t, "min_approvals", p, int, default)
    if value < 1:
        r.problems.append((f"{p}min_approvals", f"must be at least 1, got {value}"))
        return 1
    return value


def _timeout(r: _Reader, t: dict[str, Any], p: str, default: float) -> float:
    value = r.duration(t, "timeout", p, default)
    if not 1 <= value <= 7 * 86400:
        r.problems.append((f"{p}timeout", "must be between 1s and 7d"))
        return default
    return value


def _rule(r: _Reader, t: dict[str, Any], p: str, index: int, defaults: ApprovalDefaults) -> ApprovalRule:
    r.unknown(t, {"name", "pattern", "argv_prefix", "shell", "action", "subjects", "groups", "claims", "targets",
                  "clusters", "namespaces", "approvers", "min_approvals", "timeout", "message", *DELEGATION_KEYS}, p)
    kinds = [k for k in ("pattern", "argv_prefix", "shell") if k in t]
    if len(kinds) != 1:
        r.problems.append((p.rstrip("."), "give exactly one of pattern (a regex), argv_prefix (a list) or "
                                          "shell (allow/approve/deny for opening a shell)"))
    pattern = None
    raw_pattern = r.get(t, "pattern", p, str, None)
    if raw_pattern is not None:
        try:
            pattern = re.compile(raw_pattern)
        except re.error as exc:
            r.problems.append((f"{p}pattern", f"invalid regular expression {raw_pattern!r}: {exc}"))
    argv_prefix = None
    if "argv_prefix" in t:
        argv_prefix = r.strings(t, "argv_prefix", p)
        if not argv_prefix:
            r.problems.append((f"{p}argv_prefix", "must be a non-empty list of strings, e.g. [\"rm\", \"-rf\"]"))
    shell = "shell" in t
    if shell:
        action = _action(r, t, "shell", p, "allow")
        if "action" in t:
            r.problems.append((f"{p}action", "a shell rule takes its action from `shell`; remove `action`"))
    else:
        action = _action(r, t, "action", p, "approve")
    claims = r.get(t, "claims", p, dict, {})
    if not all(isinstance(v, str) for v in claims.values()):
        r.problems.append((f"{p}claims", "values must be strings (glob patterns)"))
    approvers = r.strings(t, "approvers", p) or defaults.approvers
    if action == "approve" and not approvers:
        r.problems.append((f"{p}approvers", "an 'approve' rule needs approver groups (or approval_defaults.approvers)"))
    min_approvals = _min_approvals(r, t, p, defaults.min_approvals)
    return ApprovalRule(
        name=r.get(t, "name", p, str, f"approvals[{index}]"),
        action=action,
        pattern=pattern,
        argv_prefix=argv_prefix,
        shell=shell,
        subjects=r.strings(t, "subjects", p),
        groups=r.strings(t, "groups", p),
        claims=tuple(sorted((str(k), str(v)) for k, v in claims.items())),
        targets=r.strings(t, "targets", p),
        clusters=r.strings(t, "clusters", p),
        namespaces=r.strings(t, "namespaces", p),
        approvers=approvers,
        min_approvals=min_approvals,
        timeout=_timeout(r, t, p, defaults.timeout),
        message=r.get(t, "message", p, str, None),
        delegation=parse_scope(r, t, p),
    )


def _webhook(r: _Reader, t: dict[str, Any], p: str) -> WebhookConfig:
    r.unknown(t, {"url", "format", "timeout"}, p)
    url = r.get(t, "url", p, str, "", required=True)
    if url and not re.match(r"^https?://", url):
        r.problems.append((f"{p}url", f"must be an http(s):// URL, got {url!r}"))
    fmt = r.get(t, "format", p, str, "json")
    if fmt not in ("json", "slack"):
        r.problems.append((f"{p}format", f"must be 'json' or 'slack', got {fmt!r}"))
    return WebhookConfig(url=url, format=fmt, timeout=r.duration(t, "timeout", p, 5.0))
