"""Prometheus metrics of one gateway, served at ``/metrics`` on the HTTP API.

Each gateway owns its own :class:`prometheus_client.CollectorRegistry` (never the
process-wide default one), so several gateways in one process, as in tests, never mix
their numbers. What is counted, and where it comes from:

* the session pipeline (:class:`bastion.session.Session`) reports every session start and
  end, and counts the bytes it relays in each direction; active sessions and relayed bytes
  are read from the live sessions at scrape time, so the hot path only adds two integers;
* the audit stream (every ``AuditLog.emit``) feeds the authentication failures, the
  sessions refused before they opened, the approval requests and their outcomes;
* the recorder's own counters (spool size, pending uploads, upload errors, since when the
  store fails) are read at scrape time;
* the state database is asked, at scrape time (bounded by a timeout), how many approval
  requests are pending and how many locks are active: numbers shared by every replica;
* masking reports each value it replaces with :meth:`Metrics.masked` (detector name).

docs/operations.md lists every metric with its labels.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncEngine

    from bastion.session import Session

log = logging.getLogger("guarita.metrics")

CONTENT_TYPE = CONTENT_TYPE_LATEST
# How long a scrape waits for the state database's numbers before serving the last ones.
STATE_TIMEOUT = 2.0
OUTCOMES = ("ok", "error", "disconnected", "terminated")


# What the metrics read of the gateway at scrape time (the gateway is one; a test passes a
# small object). None: that part is absent, and its numbers are not served.


class StoreProbe(Protocol):  # bastion.health.Readiness
    async def store_problem(self) -> str | None: ...


class StateDatabase(Protocol):  # bastion.state.StateStore
    @property
    def engine(self) -> AsyncEngine | None: ...


class RecorderNumbers(Protocol):  # recorder.Recorder
    @property
    def uploads_pending(self) -> int: ...
    @property
    def upload_errors(self) -> int: ...
    @property
    def spool_failures(self) -> int: ...
    @property
    def store_down_since(self) -> float | None: ...
    @property
    def sessions(self) -> Mapping[str, Any]: ...
    def spool_bytes(self) -> int: ...
    def oldest_pending_upload(self) -> float | None: ...


class WebhookNumbers(Protocol):  # bastion.approvals.webhooks.Webhooks
    @property
    def failures(self) -> int: ...


class ApprovalNumbers(Protocol):  # bastion.approvals.engine.ApprovalEngine
    @property
    def webhooks(self) -> WebhookNumbers: ...


class MetricsServices(Protocol):
    @property
    def readiness(self) -> StoreProbe | None: ...
    @property
    def state(self) -> StateDatabase | None: ...
    @property
    def recorder(self) -> RecorderNumbers | None: ...
    @property
    def approvals(self) -> ApprovalNumbers | None: ...
    @property
    def draining(self) -> bool: ...
    @property
    def kube(self) -> object | None: ...  # the Kubernetes door, when clusters are configured


def session_outcome(session: Session, status: int | None, signal: str | None) -> str:
    """``terminated`` (ended by the gateway: lock, shutdown, recording failure), ``ok`` (exit
    status 0), ``error`` (another exit status, or a signal), ``disconnected`` (no exit status:
    the client or the target went away)."""
    if session.recording.markers.get("terminated"):
        return "terminated"
    if signal is not None or (status is not None and status != 0):
        return "error"
    if status == 0:
        return "ok"
    return "disconnected"


class Metrics:
    def __init__(self, gateway: MetricsServices) -> None:
        self.gw = gateway
        disable_created_metrics()  # no *_created series: they double the output and nobody reads them
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.sessions = Counter("guarita_sessions", "Sessions that ended, by front door and outcome "
                                "(ok, error, disconnected, terminated).", ["front_door", "outcome"], registry=r)
        self.started = Counter("guarita_sessions_started", "Sessions opened, by front door.", ["front_door"],
                               registry=r)
        self.refused = Counter("guarita_sessions_refused", "Sessions refused before they opened (unknown target, "
                               "access denied, target unreachable, spool full, draining...).",
                               ["front_door", "reason"], registry=r)
        self.auth_failures = Counter("guarita_auth_failures", "Credentials refused, by front door (ssh, kube, "
                                     "api) and reason (expired, bad_signature, unknown_issuer...).",
                                     ["front_door", "reason"], registry=r)
        self.auth_throttled = Counter("guarita_auth_throttled", "Login attempts refused by the guessing limits "
                                      "(bastion/doors/ssh/authlimit.py), by scope: connection, address, subject.",
                                      ["scope"], registry=r)
        self.approval_requests = Counter("guarita_approval_requests", "Approval requests created by this "
                                         "replica.", registry=r)
        self.approvals_decided = Counter("guarita_approvals_decided", "Approval requests resolved, by decision "
                                         "(approved, denied, expired, cancelled).", ["decision"], registry=r)
        self.masked_values = Counter("guarita_masked_values", "Values replaced by masking, by detector.",
                                     ["detector"], registry=r)
        self.audit_events = Counter("guarita_audit_events", "Audit events emitted, by event name.", ["event"],
                                    registry=r)
        self.reloads = Counter("guarita_config_reloads", "Configuration reloads (SIGHUP), by result (applied, "
                               "invalid, failed).", ["result"], registry=r)
        self.approvals_pending = Gauge("guarita_approvals_pending", "Approval requests waiting for a decision "
                                       "(all replicas: read from the state database).", registry=r)
        self.locks_active = Gauge("guarita_locks_active", "Locks in force (all replicas: read from the state "
                                  "database).", registry=r)
        # The last scrape's check of the recordings store (bastion/health.py, with a timeout).
        self.store_probe_ok = True
        self.state_up = Gauge("guarita_state_up", "1 when the state database answered the last scrape's "
                              "query.", registry=r)
        # Relayed bytes of sessions that have ended, by (front door, direction); live sessions
        # are added at scrape time.
        self._ended_bytes: dict[tuple[str, str], int] = {}
        self.live: dict[str, Session] = {}
        self._started = time.time()
        r.register(_LiveCollector(self))

    # -- the session pipeline ------------------------------------------------------------------

    def session_started(self, session: Session) -> None:
        self.live[session.id] = session
        self.started.labels(session.info.front_door).inc()

    def session_ended(self, session: Session, status: int | None, signal: str | None) -> None:
        if self.live.pop(session.id, None) is None:
            return
        fd = session.info.front_door
        self.sessions.labels(fd, session_outcome(session, status, signal)).inc()
        for direction, n in (("in", session.bytes_in), ("out", session.bytes_out)):
            self._ended_bytes[(fd, direction)] = self._ended_bytes.get((fd, direction), 0) + n

    # -- masking ----------------------------------------------------------------------------------

    def masked(self, detector: str, count: int = 1) -> None:
        """Masking calls this for the values it replaced (``detector``: cpf, email, card...)."""
        if count:
            self.masked_values.labels(detector).inc(count)

    # -- the audit stream -----------------------------------------------------------------------

    def on_audit(self, event: str, fields: dict[str, Any]) -> None:
        self.audit_events.labels(event).inc()
        if event == "auth.failure":
            self.auth_failures.labels(_auth_front_door(fields), str(fields.get("reason") or "unknown")).inc()
        elif event == "auth.throttled":
            self.auth_throttled.labels(str(fields.get("scope") or "unknown")).inc()
        elif event == "session.refused":
            self.refused.labels(str(fields.get("front_door") or "ssh"), str(fields.get("reason") or "unknown")).inc()
        elif event == "approval.requested":
            self.approval_requests.inc()
        elif event == "approval.resolved":
            self.approvals_decided.labels(str(fields.get("status") or "unknown")).inc()
        elif event == "approval.expired":  # a request whose session was gone, swept by any replica
            self.approvals_decided.labels("expired").inc()

    # -- a scrape ---------------------------------------------------------------------------------

    async def refresh(self) -> None:
        """Numbers that need the state database or the recordings store (bounded: a slow one
        never blocks a scrape, and one that hangs counts as down)."""
        readiness = self.gw.readiness
        if readiness is not None:
            try:
                self.store_probe_ok = await asyncio.wait_for(readiness.store_problem(), STATE_TIMEOUT + 2) is None
            except Exception as exc:  # noqa: BLE001 - a scrape must answer whatever the store does
                log.debug("metrics: the recordings store check did not answer: %s", exc)
                self.store_probe_ok = False
        state = self.gw.state
        if state is None or state.engine is None:
            return
        try:
            values = await asyncio.wait_for(state_counts(state), STATE_TIMEOUT)
        except Exception as exc:  # noqa: BLE001 - a scrape must answer whatever the database does
            log.debug("metrics: the state database did not answer: %s", exc)
            self.state_up.set(0)
            return
        self.state_up.set(1)
        self.approvals_pending.set(values.get("approvals_pending", 0))
        self.locks_active.set(values.get("locks_active", 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def state_counts(state: StateDatabase) -> dict[str, int]:
    """Pending approval requests and locks in force (not session kills), across replicas."""
    from sqlalchemy import and_, func, or_, select

    from bastion.state import schema as s

    now = time.time()
    assert state.engine is not None  # refresh() asks only a started database
    async with state.engine.connect() as conn:
        pending = (await conn.execute(select(func.count()).select_from(s.approval_requests)
                                      .where(s.approval_requests.c.status == "pending"))).scalar_one()
        locks = (await conn.execute(select(func.count()).select_from(s.locks).where(and_(
            s.locks.c.kind != "session", s.locks.c.removed.is_(None),
            or_(s.locks.c.until.is_(None), s.locks.c.until > now))))).scalar_one()
    return {"approvals_pending": int(pending), "locks_active": int(locks)}


def _auth_front_door(fields: dict[str, Any]) -> str:
    if fields.get("front_door"):
        return str(fields["front_door"])
    if fields.get("path") is not None:
        return "api"
    return "ssh"


class _LiveCollector(Collector):
    """Numbers read from live objects at scrape time."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    def describe(self) -> Iterator[Metric]:
        return iter(())  # dynamic: not checked against other collectors' names

    def collect(self) -> Iterator[Metric]:
        m = self.m
        gw = m.gw
        active = GaugeMetricFamily("guarita_sessions_active", "Sessions open now on this replica, by front door.",
                                   labels=["front_door"])
        by_door: dict[str, int] = {"ssh": 0}
        if gw.kube is not None:
            by_door["kube"] = 0
        totals = dict(m._ended_bytes)
        for session in m.live.values():
            fd: str = session.info.front_door
            by_door[fd] = by_door.get(fd, 0) + 1
            for direction, n in (("in", session.bytes_in), ("out", session.bytes_out)):
                totals[(fd, direction)] = totals.get((fd, direction), 0) + n
        for fd, n in sorted(by_door.items()):
            active.add_metric([fd], n)
        yield active
        relayed = CounterMetricFamily("guarita_relayed_bytes", "Bytes relayed by sessions, by front door and "
                                      "direction (in: agent to target, out: target to agent).",
                                      labels=["front_door", "direction"])
        for fd in by_door:
            for direction in ("in", "out"):
                totals.setdefault((fd, direction), 0)
        for (fd, direction), n in sorted(totals.items()):
            relayed.add_metric([fd, direction], n)
        yield relayed

        rec = gw.recorder
        if rec is not None:
            now = time.time()
            yield GaugeMetricFamily("guarita_spool_bytes", "Bytes in the recording spool (waiting to be sealed or "
                                    "uploaded).", value=rec.spool_bytes())
            yield GaugeMetricFamily("guarita_uploads_pending", "Recording objects in the spool waiting for "
                                    "upload.", value=rec.uploads_pending)
            oldest = rec.oldest_pending_upload()
            lag = max(now - oldest if oldest else 0.0,
                      now - rec.store_down_since if rec.store_down_since else 0.0)
            yield GaugeMetricFamily("guarita_upload_lag_seconds", "Age of the oldest recording object waiting for "
                                    "upload (or of the store outage, if longer); 0 when nothing waits.", value=lag)
            yield GaugeMetricFamily("guarita_store_up", "0 while the recordings store fails or does not answer "
                                    "(uploads failing or hanging, or its check timing out).",
                                    value=0 if rec.store_down_since or not m.store_probe_ok else 1)
            yield CounterMetricFamily("guarita_upload_errors", "Failed upload attempts to the recordings store.",
                                      value=rec.upload_errors)
            yield GaugeMetricFamily("guarita_recordings_open", "Recordings being written.", value=len(rec.sessions))
            yield CounterMetricFamily("guarita_spool_failures", "Times a session's recording could not be written "
                                      "to the spool (each leaves a gap, or ends the session under strict).",
                                      value=rec.spool_failures)
        if gw.approvals is not None:
            yield CounterMetricFamily("guarita_webhook_failures", "Approval webhooks that could not be delivered.",
                                      value=gw.approvals.webhooks.failures)
        yield GaugeMetricFamily("guarita_draining", "1 while the gateway drains (SIGTERM received).",
                                value=1 if gw.draining else 0)
        yield GaugeMetricFamily("guarita_start_time_seconds", "When this gateway started (Unix time).",
                                value=m._started)
