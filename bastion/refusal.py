"""Why the gateway said no: the one exception every refusal is, whatever the front door.

A refusal carries three things, always in this order: ``reason`` (a short stable word,
the ``reason`` of the ``session.refused`` audit event and the label of
``guarita_sessions_refused_total``), ``message`` (the one line the user reads: on the
SSH client's stderr, in the Kubernetes Status kubectl prints) and ``status`` (the HTTP
status a request-based door answers with). Front doors catch :class:`Refused` and turn it
into their protocol's way of saying no; nothing else is needed to add a refusal.

This module imports nothing of the project, so every layer may raise it.
"""

from __future__ import annotations


class Refused(Exception):
    """A session (or request) the gateway will not open."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.status = status

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.reason!r}, {self.message!r}, {self.status})"

