"""Kubernetes connections that are not sessions but are held to their caller like one.

A port-forward tunnel, a watch (``kubectl get -w``) and a followed log (``kubectl logs
-f``) can stay open for hours. None is a recorded session, yet each must end when the
caller's access ends: a lock or kill that matches it (``Control.enforce`` calls
:meth:`HeldStream.stop`), the caller's credential expiry (per the access rule's
``on_expiry``) and the rule's ``max_duration`` (:meth:`HeldStream.watch_limits`).
``idle_timeout`` does not apply: a quiet watch is what a watch is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from bastion.session import SessionInfo, hard_limits
from recorder.recorder import new_session_id

if TYPE_CHECKING:
    from bastion.config import AccessRule
    from bastion.identity import Identity
    from bastion.services import Services


class HeldStream:
    """What bastion/control needs of a live connection: ``id``, ``info``, ``ended``,
    ``stopping`` and ``stop()``. ``on_stop(message)`` closes the connection. ``rule`` is
    the access rule that allowed the request: its limits are the stream's."""

    def __init__(self, gw: Services, kind: str, identity: Identity, source: str, cluster: str,
                 extra: dict[str, Any], on_stop: Callable[[str], None], rule: AccessRule | None) -> None:
        self.gw = gw
        self.kind = kind
        self.id = new_session_id()
        self.info = SessionInfo(front_door="kube", identity=identity, source=source, target=cluster, kind=kind,
                                extra=extra, rule=rule)
        self.ended = False
        self.stopping = False
        self.reason: str | None = None
        self._on_stop = on_stop
        self._control = gw.control
        self._live = gw.live
        self._watchdog: asyncio.Task[None] | None = None

    def __enter__(self) -> HeldStream:
        self._live.held_started(self)
        self._watchdog = asyncio.create_task(self.watch_limits())
        return self

    def __exit__(self, *exc: object) -> None:
        self.ended = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._live.held_ended(self)

    def stop(self, kind: str, message: str, **fields: Any) -> bool:
        """End it from the gateway's side (lock, kill, expiry): audited, then closed."""
        if self.ended:
            return True
        if not self.stopping:
            self.stopping = True
            self.reason = message
            identity = self.info.identity
            self.gw.audit.emit(f"kube.{self.kind}.stopped", stream=self.id, kind=kind, reason=message,
                               subject=identity.subject, cluster=self.info.target,
                               **{k: v for k, v in {**self.info.extra, **fields}.items()
                                  if k not in ("reason", "kind", "stream", "subject", "cluster")})
        self._on_stop(message)
        return True

    async def watch_limits(self) -> None:
        limits = self._control.limits_for(self.info)
        what = "port-forward" if self.kind == "portforward" else "stream"
        ends = hard_limits(self.info.identity.expires_at or None, limits, time.time(), what)
        if not ends:
            return
        deadline, kind, message, _ = min(ends)
        await asyncio.sleep(max(0.0, deadline - time.time()))
        self.stop(kind, message, limit=kind, rule=limits.rule)
