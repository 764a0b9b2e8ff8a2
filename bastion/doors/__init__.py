"""The front doors: one listener per protocol, each behind :class:`FrontDoor`.

A door translates its protocol (SSH, the Kubernetes API, MCP) and hands each session to
the pipeline (bastion/pipeline.py: ``open_session``, with a ``ClientSide`` of its own). The
composition root (bastion/gateway.py) starts the doors, stops them accepting on SIGTERM
(bastion/lifecycle.py) and stops them after their sessions were ended, all through this
interface. This module imports nothing of guarita's, so anything may name the protocol.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class FrontDoor(Protocol):
    """A listener the gateway starts and stops."""

    async def start(self) -> None:
        """Listen (a door given port 0 knows its port afterwards). Raises when it cannot,
        having released what it had taken."""

    async def stop_accepting(self) -> None:
        """SIGTERM: no new connections; connections and sessions already open go on."""

    async def stop(self) -> None:
        """After the gateway ended the live sessions: close the rest (idempotent)."""
