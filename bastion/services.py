"""What the gateway's parts may ask of each other: the services the composition root
(bastion/gateway.py) builds and hands to every component.

Components are typed against :class:`Services`, never against ``Gateway``, so no module
imports the gateway (it imports them all) and the import graph has no cycle
(tests/test_import_cycles.py). A test, or another composition root, passes any object
with the attributes a component uses.

Attributes typed ``Any`` are components that themselves take ``Services`` (approvals,
control, metrics, readiness...): naming their classes here would tie this module back to
them. Their own modules are typed.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import asyncssh

from bastion.audit import AuditLog
from bastion.config import Config, ConfigSource
from bastion.doors import FrontDoor
from bastion.identity.oidc import TokenVerifier
from bastion.identity.usercert import UserCA
from bastion.live import LiveSessions
from bastion.state.store import StateStore
from recorder import Recorder, RecordingKey, RecordingStore


class Services(Protocol):
    """The gateway's shared parts, as its components see them."""

    config: Config
    audit: AuditLog
    recorder: Recorder
    store: RecordingStore
    state: StateStore
    live: LiveSessions
    verifier: TokenVerifier
    user_ca: UserCA
    host_key: asyncssh.SSHKey
    target_ca: asyncssh.SSHKey
    masking_secret: bytes | None
    recording_key: RecordingKey
    # Components built on these services (typed in their own modules).
    approvals: Any  # bastion.approvals.engine.ApprovalEngine
    control: Any  # bastion.control.Control
    metrics: Any  # bastion.metrics.Metrics
    readiness: Any  # bastion.health.Readiness
    dev_issuer: Any  # bastion.identity.devissuer.DevIssuer | None
    interactive_gate: Any  # bastion.approvals.interactive.InteractiveGate (its class: a factory)
    line_gate: Any  # bastion.approvals.linediscipline.line_gate (a factory; None when no commands)
    # Lifecycle (bastion/lifecycle.py): SIGTERM drains, SIGHUP reloads config_source.
    draining: bool
    stopping: asyncio.Event
    hurry: asyncio.Event
    config_source: ConfigSource | None
    config_raw: dict[str, Any]
    doors: list[FrontDoor]  # the session doors (bastion/doors), started; drained by bastion/lifecycle.py
    kube: Any  # the Kubernetes front door, when clusters are configured (its CA for `bastion kubeconfig`)
    demo: Any  # the built-in demo target, in --dev
