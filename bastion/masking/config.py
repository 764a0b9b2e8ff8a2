"""The ``[masking]`` table of the gateway configuration.

```toml
[masking]
secret_file = "masking.key"     # HMAC key of the masking log; created (mode 0600) if missing
default_apply = "both"          # where masking applies when no rule matches:
                                # "live", "recording", "both" or "none"
flush_after = "5ms"             # show the held-back echo of typed text after this much silence
alt_screen = "mask"             # full-screen programs are scanned too ("mask", the only value)

[masking.detectors.card]        # built-ins: cpf cnpj card phone_br phone_e164 email
enabled = true
style = "keep_last"             # redact | keep_last | tag | fixed
keep_last = 4
tag = "[CARD]"
fixed = "**** **** **** ****"

[[masking.custom]]
name = "matricula"
pattern = "MAT-[0-9]{6}"        # bounded repetition only, see docs/masking.md
style = "tag"
tag = "[MATRICULA]"

[[masking.rules]]               # ordered; the first rule that matches decides
targets = ["web-*"]             # SSH targets (globs)
clusters = ["prod-*"]           # Kubernetes clusters (globs)
groups = ["support"]            # the session's identity has one of these groups
apply = "both"
```

:func:`parse_masking` returns the :class:`MaskingConfig` and every problem found as
``(key, message)`` pairs, the way ``bastion.config`` reports them.
"""

from __future__ import annotations

import fnmatch
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.masking.detectors import (
    BUILTIN_NAMES,
    BUILTINS,
    STYLES,
    Detector,
    Replacement,
    builtin_detector,
    check_pattern,
    custom_detector,
)
from bastion.masking.stream import StreamMasker
from recorder.secretfile import write_secret

APPLY = ("live", "recording", "both", "none")
SECRET_BYTES = 32
_CUSTOM_NAME = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s)?\s*$")


@dataclass(frozen=True)
class DetectorSettings:
    """A built-in detector as configured (None: the detector's default)."""

    name: str
    enabled: bool = True
    style: str | None = None
    keep_last: int | None = None
    tag: str | None = None
    fixed: str | None = None


@dataclass(frozen=True)
class CustomPattern:
    name: str
    pattern: str
    style: str = "redact"
    keep_last: int = 4
    tag: str | None = None
    fixed: str = "****"


@dataclass(frozen=True)
class MaskingRule:
    """Where masking applies for the sessions it matches.

    A rule matches when the session's SSH target matches one of ``targets`` or its
    Kubernetes cluster one of ``clusters`` (if the rule names any), and the identity has
    a group matching one of ``groups`` (if the rule names any). A rule naming nothing
    matches every session.
    """

    targets: tuple[str, ...] = ()
    clusters: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    apply: str = "both"

    def matches(self, target: str | None, cluster: str | None, groups: Sequence[str]) -> bool:
        if self.targets or self.clusters:
            place = (target is not None and any(fnmatch.fnmatchcase(target, p) for p in self.targets)) or (
                cluster is not None and any(fnmatch.fnmatchcase(cluster, p) for p in self.clusters))
            if not place:
                return False
        if self.groups:
            return any(fnmatch.fnmatchcase(g, p) for g in groups for p in self.groups)
        return True


@dataclass(frozen=True)
class MaskingConfig:
    secret_file: Path
    default_apply: str = "both"
    detectors: tuple[DetectorSettings, ...] = tuple(DetectorSettings(n) for n in BUILTIN_NAMES)
    custom: tuple[CustomPattern, ...] = ()
    rules: tuple[MaskingRule, ...] = ()
    flush_after: float = 0.005
    alt_screen: str = "mask"

    def where(self, target: str | None, cluster: str | None, groups: Sequence[str]) -> str:
        """"live", "recording", "both" or "none" for a session (first matching rule wins)."""
        for rule in self.rules:
            if rule.matches(target, cluster, groups):
                return rule.apply
        return self.default_apply

    def build_detectors(self) -> list[Detector]:
        """Enabled built-ins (in priority order), then the custom detectors."""
        out = [
            builtin_detector(s.name, style=s.style, keep_last=s.keep_last, tag=s.tag, fixed=s.fixed)
            for s in self.detectors if s.enabled
        ]
        out += [custom_detector(c.name, c.pattern, style=c.style, keep_last=c.keep_last, tag=c.tag,
                                fixed=c.fixed) for c in self.custom]
        return out

    def masker(self, secret: bytes, detectors: Sequence[Detector] | None = None) -> StreamMasker:
        # No screen mode switches masking off: full-screen programs are scanned too.
        return StreamMasker(self.build_detectors() if detectors is None else detectors, secret)


def parse_masking(table: Any, base: Path, data_dir: Path | None = None) -> tuple[MaskingConfig, list[tuple[str, str]]]:
    """Parse the ``[masking]`` table (the dict under the key ``masking``).

    Relative paths are relative to ``base`` (the configuration file's directory); the
    secret defaults to ``<data_dir>/masking.key``.
    """
    problems: list[tuple[str, str]] = []
    p = "masking."
    if table is None:
        table = {}
    if not isinstance(table, dict):
        problems.append(("masking", "must be a table: write [masking]"))
        table = {}
    _unknown(problems, table, {"secret_file", "default_apply", "flush_after", "alt_screen", "detectors",
                               "custom", "rules"}, p)

    secret_file = (data_dir or base) / "masking.key"
    raw_secret = _get(problems, table, "secret_file", p, str, None)
    if raw_secret:
        sp = Path(raw_secret).expanduser()
        secret_file = sp if sp.is_absolute() else base / sp

    default_apply = _get(problems, table, "default_apply", p, str, "both")
    if default_apply not in APPLY:
        problems.append((f"{p}default_apply", f"must be one of {', '.join(APPLY)}, got {default_apply!r}"))
        default_apply = "both"

    flush_after = 0.005
    if "flush_after" in table:
        flush_after = _duration(problems, table["flush_after"], f"{p}flush_after", 0.005)
        if not 0 < flush_after <= 0.1:
            problems.append((f"{p}flush_after", "must be more than 0 and at most 100ms (it delays interactive output)"))
            flush_after = 0.005

    alt_screen = _get(problems, table, "alt_screen", p, str, "mask")
    if alt_screen != "mask":
        problems.append((f"{p}alt_screen", f"must be 'mask', got {alt_screen!r}: full-screen programs are always "
                         "scanned (a screen mode must not switch masking off); remove the key"))
        alt_screen = "mask"

    detectors = _detectors(problems, _get(problems, table, "detectors", p, dict, {}), f"{p}detectors.")
    custom = _customs(problems, table.get("custom", []), f"{p}custom")
    rules = _rules(problems, table.get("rules", []), f"{p}rules")
    cfg = MaskingConfig(secret_file=secret_file, default_apply=default_apply, detectors=detectors,
                        custom=custom, rules=rules, flush_after=flush_after, alt_screen=alt_screen)
    return cfg, problems


def _detectors(problems: list[tuple[str, str]], table: dict[str, Any], p: str) -> tuple[DetectorSettings, ...]:
    for name in table:
        if name not in BUILTINS:
            problems.append((f"{p}{name}", f"unknown detector (built-ins: {', '.join(BUILTIN_NAMES)}; "
                                           "custom patterns go in [[masking.custom]])"))
    out = []
    for name in BUILTIN_NAMES:
        t = table.get(name, {})
        k = f"{p}{name}."
        if not isinstance(t, dict):
            problems.append((f"{p}{name}", f"must be a table: write [masking.detectors.{name}]"))
            t = {}
        _unknown(problems, t, {"enabled", "style", "keep_last", "tag", "fixed"}, k)
        style, keep_last, tag, fixed = _style(problems, t, k)
        out.append(DetectorSettings(name, _get(problems, t, "enabled", k, bool, True), style, keep_last, tag, fixed))
    return tuple(out)


def _style(problems: list[tuple[str, str]], t: dict[str, Any], k: str) -> tuple[str | None, int | None, str | None, str | None]:
    style = _get(problems, t, "style", k, str, None)
    if style is not None and style not in STYLES:
        problems.append((f"{k}style", f"must be one of {', '.join(STYLES)}, got {style!r}"))
        style = None
    keep_last = _get(problems, t, "keep_last", k, int, None)
    if keep_last is not None and not 1 <= keep_last <= 16:
        problems.append((f"{k}keep_last", f"must be 1..16, got {keep_last}"))
        keep_last = None
    texts: list[str | None] = []
    for key in ("tag", "fixed"):
        text = _get(problems, t, key, k, str, None)
        if text is not None:
            try:
                Replacement(tag=text) if key == "tag" else Replacement(fixed=text)
            except ValueError:
                problems.append((f"{k}{key}", "must be 1-64 printable ASCII characters (no control "
                                              f"characters or escape sequences), got {text!r}"))
                text = None
        texts.append(text)
    return style, keep_last, texts[0], texts[1]


def _customs(problems: list[tuple[str, str]], value: Any, p: str) -> tuple[CustomPattern, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append((p, "must be an array of tables: write [[masking.custom]]"))
        return ()
    out = []
    seen: set[str] = set()
    for i, t in enumerate(value):
        k = f"{p}[{i}]."
        _unknown(problems, t, {"name", "pattern", "style", "keep_last", "tag", "fixed"}, k)
        name = _get(problems, t, "name", k, str, "", required=True)
        pattern = _get(problems, t, "pattern", k, str, "", required=True)
        ok = bool(name and pattern)
        if name and not _CUSTOM_NAME.match(name):
            problems.append((f"{k}name", "lower-case letters, digits and '_', starting with a letter (at most 32)"))
            ok = False
        elif name in BUILTINS:
            problems.append((f"{k}name", f"{name!r} is a built-in detector: configure it in [masking.detectors.{name}]"))
            ok = False
        elif name in seen:
            problems.append((f"{k}name", f"duplicate custom detector name {name!r}"))
            ok = False
        seen.add(name)
        if pattern:
            for msg in check_pattern(pattern):
                problems.append((f"{k}pattern", msg))
                ok = False
        style, keep_last, tag, fixed = _style(problems, t, k)
        if ok:
            out.append(CustomPattern(name, pattern, style or "redact", keep_last or 4, tag, fixed or "****"))
    return tuple(out)


def _rules(problems: list[tuple[str, str]], value: Any, p: str) -> tuple[MaskingRule, ...]:
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        problems.append((p, "must be an array of tables: write [[masking.rules]]"))
        return ()
    out = []
    for i, t in enumerate(value):
        k = f"{p}[{i}]."
        _unknown(problems, t, {"targets", "clusters", "groups", "apply"}, k)
        apply = _get(problems, t, "apply", k, str, "", required=True)
        if apply and apply not in APPLY:
            problems.append((f"{k}apply", f"must be one of {', '.join(APPLY)}, got {apply!r}"))
        lists = [_strings(problems, t, key, k) for key in ("targets", "clusters", "groups")]
        if apply in APPLY:
            out.append(MaskingRule(lists[0], lists[1], lists[2], apply))
    return tuple(out)


def _get(problems: list[tuple[str, str]], table: dict[str, Any], key: str, p: str,
         kind: type, default: Any, required: bool = False) -> Any:
    if key not in table:
        if required:
            problems.append((f"{p}{key}", "is required"))
        return default
    value = table[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        problems.append((f"{p}{key}", f"must be {kind.__name__}, got {value!r}"))
        return default
    return value


def _strings(problems: list[tuple[str, str]], table: dict[str, Any], key: str, p: str) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        problems.append((f"{p}{key}", "must be a list of non-empty strings (glob patterns)"))
        return ()
    return tuple(value)


def _duration(problems: list[tuple[str, str]], value: Any, key: str, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    m = _DURATION.match(str(value)) if isinstance(value, str) else None
    if not m:
        problems.append((key, f"expected a duration like '5ms', got {value!r}"))
        return default
    return float(m.group(1)) * (0.001 if m.group(2) == "ms" else 1.0)


def _unknown(problems: list[tuple[str, str]], table: dict[str, Any], known: set[str], p: str) -> None:
    for key in table:
        if key not in known:
            problems.append((f"{p}{key}", f"unknown key (known: {', '.join(sorted(known))})"))


# ---------------------------------------------------------------------------------------
# The HMAC secret


def load_or_create_secret(path: Path) -> bytes:
    """The masking HMAC key in ``path``; a new random one (mode 0600) if the file is missing.

    The file holds the key as hex on one line (or raw bytes); at least 32 bytes. Creation
    is atomic, so two gateways starting together end up with the same key.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        # Atomic, and never over a key another process wrote first (recorder/secretfile.py).
        write_secret(path, (secrets.token_bytes(SECRET_BYTES).hex() + "\n").encode())
        data = path.read_bytes()
    return _decode_secret(data, path)


def _decode_secret(data: bytes, path: Path) -> bytes:
    text = data.strip()
    if re.fullmatch(rb"[0-9a-fA-F]+", text) and len(text) % 2 == 0:
        key = bytes.fromhex(text.decode())
    else:
        key = data
    if len(key) < SECRET_BYTES:
        raise ValueError(f"{path}: the masking secret must hold at least {SECRET_BYTES} bytes "
                         f"(64 hex digits). Keep the old key: hashes in earlier sessions can only be checked with it")
    return key
