"""Masking ``kubectl logs`` (the pods/log subresource) on clusters where masking applies.

``kubectl logs`` is a plain HTTP response, not a session: nothing is recorded. Where the
masking policy applies to live output for this cluster and identity (``live`` or
``both``), the log stream goes through a :class:`StreamMasker` like exec output does:
the client never gets an original value. What was masked is written to the audit log as
``kube.logs.masked`` events (detector, stream offset, length and keyed hash per value,
as in a recording's masking markers), at most :data:`VALUES_PER_EVENT` values each.

With ``recording`` there is no recording to mask, so the logs pass as they are.
Other API responses (ConfigMaps, Secrets, Events...) are JSON objects and are not
masked: docs/masking.md says so, and what an agent may read there is a matter for
the cluster's RBAC (guarita impersonates the caller).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

from bastion.identity import Identity
from bastion.masking import StreamMasker
from bastion.masking.stream import Masked

if TYPE_CHECKING:
    import aiohttp

    from bastion.config import Config
    from bastion.doors.kube.policy import KubeRequest

VALUES_PER_EVENT = 500


class AuditSink(Protocol):
    def emit(self, event: str, **fields: Any) -> None: ...


class MaskCounter(Protocol):  # bastion.metrics.Metrics
    def masked(self, detector: str, count: int = 1) -> None: ...


class LogMaskServices(Protocol):
    """What masking ``kubectl logs`` uses of the gateway (which is one; a test passes a small object)."""

    @property
    def config(self) -> Config: ...
    @property
    def masking_secret(self) -> bytes | None: ...
    @property
    def audit(self) -> AuditSink: ...
    @property
    def metrics(self) -> MaskCounter | None: ...


def log_masker(gw: LogMaskServices, req: KubeRequest, cluster: str, identity: Identity) -> StreamMasker | None:
    """A masker for this request if it reads pod logs where the live output is masked."""
    masking = gw.config.masking
    secret = gw.masking_secret
    if masking is None or secret is None or req.resource != "pods" or req.subresource != "log":
        return None
    if masking.where(None, cluster, identity.groups) not in ("live", "both"):
        return None
    return masking.masker(secret)


class MaskedLogRelay:
    """Copies one log response to the client through a masker. A held-back tail goes out
    once the log lines after it decide it, or at the end: never on a pause of the log (the
    masker decides on content, never on time; a log line ends in a newline anyway)."""

    def __init__(self, gw: LogMaskServices, masker: StreamMasker, fields: dict[str, Any]) -> None:
        self.gw = gw
        self.masker = masker
        self.fields = fields
        self.counts: Counter[str] = Counter()
        self._values: list[list[Any]] = []

    async def relay(self, resp: aiohttp.ClientResponse, out: web.StreamResponse) -> None:
        try:
            while chunk := await resp.content.readany():
                await self._write(out, *self.masker.feed(chunk))
            await self._write(out, *self.masker.flush())
        finally:
            self._emit()

    async def _write(self, out: web.StreamResponse, data: bytes, found: list[Masked]) -> None:
        if found:
            self._note(found)
        if data:
            await out.write(data)

    def _note(self, found: list[Masked]) -> None:
        metrics = self.gw.metrics
        for detector, n in Counter(m.detector for m in found).items():
            self.counts[detector] += n
            if metrics is not None:
                metrics.masked(detector, n)
        self._values.extend([m.detector, m.offset, m.length, m.hmac] for m in found)
        if len(self._values) >= VALUES_PER_EVENT:
            self._emit()

    def _emit(self) -> None:
        while self._values:
            batch, self._values = self._values[:VALUES_PER_EVENT], self._values[VALUES_PER_EVENT:]
            self.gw.audit.emit("kube.logs.masked", **self.fields, masking=dict(self.counts), values=batch)
