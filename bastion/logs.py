"""The gateway's own log: JSON lines for machines, plain text for people.

``bastion serve`` writes its log to stderr: one JSON object per line when stderr is not a
terminal (a container, a systemd journal, a file), plain text on a terminal; ``--log-format
json|text`` (or ``GUARITA_LOG_FORMAT``) chooses explicitly. Every line carries the time,
the level, the logger and the message, plus the extra fields of the record: those given
with ``log.info(..., extra={"session": sid})`` and the id of the session whose task logged
(:data:`current_session`, set by the session pipeline), so a log search by session id
finds the gateway's own lines about it beside the audit events.

Python warnings (a dependency's deprecation notice, say) never reach stderr on their own:
:func:`capture_warnings` runs when the ``bastion`` or ``replay`` package is imported and
keeps them until :func:`setup_logging` configures the log, which then emits them as log
records (a JSON line when the log is JSON). Commands that configure no log (``ssh-cert``,
``keys``, ``replay``) show none. A dependency's deprecation is logged at DEBUG (seen with
``-v``): it is a note for whoever upgrades, not something an operator must act on.

This is not the audit log (``gateway.audit_log``), which has a fixed schema for a SIEM.
"""

from __future__ import annotations

import contextvars
import json
import logging
import sys
import warnings
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("auto", "json", "text")

# The session the current task works for (set by bastion.session.Session).
current_session: contextvars.ContextVar[str | None] = contextvars.ContextVar("guarita_session", default=None)

# Attributes every LogRecord has: anything else on a record is an extra field.
_STANDARD = set(logging.LogRecord("x", logging.INFO, "x", 0, "x", None, None).__dict__) | {"message", "asctime",
                                                                                          "taskName"}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")}


class SessionFilter(logging.Filter):
    """Adds ``session`` to records logged by a task that works for a session."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            sid = current_session.get()
            if sid is not None:
                record.session = sid
        return True


class JsonFormatter(logging.Formatter):
    """``{"ts", "level", "logger", "message", ...extra fields, "exc"}`` on one line."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {"ts": _iso(record.created), "level": record.levelname.lower(),
                               "logger": record.name, "message": record.getMessage()}
        for key, value in extra_fields(record).items():
            out.setdefault(key, value)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, ensure_ascii=False, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``2026-11-25 08:11:06,123 INFO guarita.ssh: message  session=... key=value``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extras = extra_fields(record)
        if not extras:
            return text
        first, sep, rest = text.partition("\n")  # a traceback stays below the first line
        fields = " ".join(f"{k}={v}" for k, v in extras.items())
        return f"{first}  {fields}{sep}{rest}"


WARNINGS_LOGGER = "py.warnings"


class _HeldWarnings(logging.Handler):
    """Keeps the warnings raised before the log is configured (at most ``limit``)."""

    def __init__(self, limit: int = 100) -> None:
        super().__init__(logging.DEBUG)
        self.limit = limit
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if len(self.records) < self.limit:
            self.records.append(record)


_held = _HeldWarnings()


def _is_deprecation(category: type[Warning]) -> bool:
    # cryptography's CryptographyDeprecationWarning is a UserWarning, not a DeprecationWarning.
    return issubclass(category, DeprecationWarning | PendingDeprecationWarning) or "Deprecat" in category.__name__


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: Any = None, line: str | None = None) -> None:
    level = logging.DEBUG if _is_deprecation(category) else logging.WARNING
    logger = logging.getLogger(WARNINGS_LOGGER)
    holding = _held in logger.handlers  # the log's level is not known yet: keep every warning
    if holding or logger.isEnabledFor(level):
        logger.handle(logger.makeRecord(logger.name, level, filename, lineno, "%s: %s", (category.__name__, message),
                                        None, extra={"warning": category.__name__, "source": f"{filename}:{lineno}"}))


def capture_warnings() -> None:
    """Route Python warnings into logging, held until :func:`setup_logging` (idempotent)."""
    logger = logging.getLogger(WARNINGS_LOGGER)
    if _held not in logger.handlers and not getattr(warnings.showwarning, "_guarita", False):
        logger.addHandler(_held)
        logger.propagate = False
    warnings.showwarning = _show_warning
    _show_warning._guarita = True  # type: ignore[attr-defined]


def _release_held_warnings() -> None:
    logger = logging.getLogger(WARNINGS_LOGGER)
    logger.removeHandler(_held)
    logger.propagate = True
    held, _held.records = _held.records, []
    for record in held:
        if logger.isEnabledFor(record.levelno):
            logger.handle(record)


def resolve_format(fmt: str, stream: IO[str]) -> str:
    """``auto``: text on a terminal, JSON otherwise."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):
        return "json"


def setup_logging(fmt: str = "auto", verbose: bool = False, stream: IO[str] | None = None) -> str:
    """Configure the root logger for ``bastion serve``; returns the format in use."""
    stream = stream or sys.stderr
    chosen = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    handler.addFilter(SessionFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    capture_warnings()
    _release_held_warnings()
    for noisy in ("asyncssh", "aiohttp.access", "botocore", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return chosen
