"""The gateway process: builds every shared part from the config and runs the front doors."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bastion import lifecycle
from bastion.approvals.engine import ApprovalEngine
from bastion.approvals.interactive import InteractiveGate
from bastion.approvals.linediscipline import line_gate
from bastion.archive_indexer import ArchiveIndexer
from bastion.audit import AuditLog
from bastion.config import Config, ConfigSource, TargetConfig
from bastion.control import Control
from bastion.devmode import DEMO_TARGET, dev_config  # noqa: F401 - dev_config: callers import it here
from bastion.doors import FrontDoor
from bastion.health import Readiness
from bastion.identity.devissuer import DevIssuer
from bastion.identity.oidc import TokenVerifier
from bastion.identity.usercert import UserCA, load_or_create_key
from bastion.live import LiveSessions
from bastion.metrics import Metrics
from bastion.state import StateError, open_state
from recorder import Recorder, RecordingKey, open_store
from recorder.store import is_outage
from recorder.uploads import uploader_for

if TYPE_CHECKING:
    from aiohttp import web

    from bastion.demo.sshtarget import DemoTarget
    from bastion.doors.kube.frontdoor import KubeFrontDoor
    from bastion.doors.ssh.frontdoor import SshFrontDoor

log = logging.getLogger("guarita")


def _log_masking_engine(detectors: list[Any]) -> None:
    """Say at start which masking engine runs: the Python one is ~10x slower on text dense
    with personal data, and an install without a compiler falls back to it silently."""
    from bastion.masking import engine

    if engine.ENABLED and all(engine.is_builtin(d) for d in detectors):
        log.info("masking: compiled engine")
    elif engine.ENABLED:
        log.info("masking: in Python, because the configuration has custom detectors (the compiled "
                 "engine covers the built-in ones only; same output, slower)")
    elif engine._engine is not None:
        log.info("masking: GUARITA_MASKING_ENGINE=python, masking runs in Python")
    else:
        log.warning("masking: the compiled engine is not built (pip install needs gcc and OpenSSL's "
                    "headers, Debian: gcc libssl-dev); masking runs in Python: same output, about 10x "
                    "slower on output dense with personal data")

# How long the start-up check of the recordings store may take before it counts as an outage.
STORE_CHECK_TIMEOUT = 10.0


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        config.data_dir.mkdir(parents=True, exist_ok=True)
        self.audit = AuditLog(config.audit_log)
        self.host_key = load_or_create_key(config.host_key)
        self.user_ca = UserCA(load_or_create_key(config.user_ca_key), max_ttl=config.cert_max_ttl)
        self.target_ca = load_or_create_key(config.target_ca_key)
        self.recording_key = RecordingKey.load_or_create(config.recording.key_file)
        # The key of the masking log's HMACs: a plain hash of a CPF is brute-forced in seconds.
        self.masking_secret: bytes | None = None
        if config.masking is not None:
            from bastion.masking.config import load_or_create_secret

            self.masking_secret = load_or_create_secret(config.masking.secret_file)
            _log_masking_engine(config.masking.build_detectors())
        self.store = open_store(config.recording.url, config.recording.lock_mode, config.recording.retention)
        rc = config.recording
        self.recorder = Recorder(self.store, rc.spool_dir, self.recording_key, segment_seconds=rc.segment_seconds,
                                 segment_bytes=rc.segment_bytes, flush_interval=rc.flush_interval,
                                 failure_policy=rc.failure_policy, spool_budget=rc.spool_budget,
                                 uploader=uploader_for(rc.url, rc.lock_mode, rc.retention, self.store))
        self.dev_issuer: DevIssuer | None = None
        if config.dev:
            issuer = config.issuers[0]
            self.dev_issuer = DevIssuer(config.data_dir / "dev_issuer_key.pem", issuer.issuer, issuer.audience)
        self.verifier = TokenVerifier(config.issuers)
        # State (approvals, commands index, live sessions; SQLite or PostgreSQL) and approvals.
        self.state = open_state(config.state, replica_name=config.state_replica
                                or f"{socket.gethostname()}:{config.data_dir}")
        self.approvals = ApprovalEngine(self)
        self.interactive_gate = InteractiveGate  # built by sessions whose terminal commands rules concern
        self.line_gate = line_gate  # ... and by sessions without a terminal (guarita is the line discipline)
        # The archive index: sessions, commands and masked hashes, filled as manifests are stored.
        self.archive = ArchiveIndexer(self.state, self.store)
        self.recorder.on_session_stored = self.archive.session_stored
        # Locks, session kills, per-identity limits and session limits (bastion/control).
        self.control = Control(self)
        self.demo: DemoTarget | None = None
        # The one registry of live sessions (shutdown, locks, kills, limits, `sessions ls`).
        self.live = LiveSessions(lambda: self.state)
        # The session doors (SSH, Kubernetes), in the order they start; the HTTP API (and the
        # MCP door mounted on it) apart: it starts before the verifier and stops last.
        self.doors: list[FrontDoor] = []
        self.http: FrontDoor | None = None
        self.stopping = asyncio.Event()
        # Operations (bastion/lifecycle.py, bastion/metrics.py, bastion/health.py): SIGTERM
        # drains (readyz turns 503 at once; a second signal cuts the grace short), SIGHUP
        # reads config_source again (config_raw is what runs).
        self.draining = False
        self.hurry = asyncio.Event()
        self.config_source: ConfigSource | None = None
        self.config_raw: dict[str, Any] = {}
        self.metrics = Metrics(self)
        self.audit.listeners.append(self.metrics.on_audit)
        self.readiness = Readiness(self)
        self.http_port = 0
        self._ssh: SshFrontDoor | None = None
        # Kubernetes front door (bastion/doors/kube), started only when clusters are configured.
        self.kube: KubeFrontDoor | None = None

    async def start(self) -> None:
        from bastion.http.api import HttpApi
        from bastion.http.control_api import add_routes as control_routes

        try:
            problems = await asyncio.wait_for(asyncio.to_thread(self.store.check), STORE_CHECK_TIMEOUT)
        except TimeoutError:
            problems = [f"{self.store.url} did not answer within {STORE_CHECK_TIMEOUT:g}s"]
        if problems:
            # One problem on one line; several as a list (each may contain ';' and commands).
            detail = f" {problems[0]}" if len(problems) == 1 else "".join(f"\n  - {p}" for p in problems)
            # An outage (the store does not answer) is what the spool is for, the same whether
            # the gateway is starting or running: sessions go on, recordings wait in the spool
            # (up to recording.spool_budget), /readyz and guarita_store_up say so. A store that
            # answers but is unfit (no bucket, no Object Lock, access denied) refuses under strict.
            outage = all(is_outage(p) for p in problems)
            if self.config.recording.failure_policy == "strict" and not outage:
                raise RuntimeError(f"recordings store {self.store.url} is not usable:{detail}")
            if outage:
                log.error("ALERT recordings store %s does not answer:%s (starting anyway: recordings wait in the "
                          "spool %s and are uploaded when it answers; /readyz reports it)", self.store.url, detail,
                          self.config.recording.spool_dir)
                problems = []
        if problems:
            # best_effort: sessions go on; recordings wait in the spool until the store is fixed.
            log.error("ALERT recordings store %s is not usable:%s (failure_policy = best_effort: starting "
                      "anyway, recordings stay in the spool)", self.store.url, detail)
        if not self.store.write_once:
            log.warning("recordings go to %s, a local folder: NOT write-once (use s3:// with Object Lock in "
                        "production)", self.store.url)
        recovered = await self.recorder.start()
        for sid in recovered:
            self.audit.emit("recording.recovered", session=sid)
        if self.config.demo_target:
            await self._start_demo()
        try:
            await self.state.start()
        except StateError as exc:
            raise RuntimeError(str(exc)) from None
        await self.archive.start()
        await self.approvals.start()
        await self.control.start()
        http = HttpApi(self, self._http_routes(control_routes))
        self.http = http
        await http.start()
        self.http_port = http.port
        await self.verifier.start()
        for door in self._session_doors():
            await door.start()  # a door that cannot start has released what it took, and raises
            self.doors.append(door)

    def _session_doors(self) -> list[FrontDoor]:
        """The front doors this configuration has, each a FrontDoor (bastion/doors)."""
        from bastion.doors.ssh.frontdoor import SshFrontDoor

        ssh = SshFrontDoor(self)
        doors: list[FrontDoor] = [ssh]
        self._ssh = ssh
        if self.config.clusters:
            from bastion.doors.kube.exec import STREAMING
            from bastion.doors.kube.frontdoor import KubeFrontDoor

            self.kube = KubeFrontDoor(self, STREAMING)
            doors.append(self.kube)
        return doors

    @property
    def ssh_port(self) -> int:
        return self._ssh.port if self._ssh is not None else 0

    @property
    def kube_port(self) -> int:
        return self.kube.port if self.kube is not None else 0

    def _http_routes(self, control_routes: Callable[[web.Application], None]
                     ) -> list[Callable[[web.Application], None]]:
        """The HTTP API's routes beyond its own: locks, live sessions and kills; the MCP front
        door (bastion/doors/mcp, when enabled); the web console under /console/ (and, in --dev, the
        dev issuer's sign-in page)."""
        from bastion.console.routes import add_routes as add_console_routes

        routes = [control_routes]
        if self.config.mcp.enabled:
            from bastion.doors.mcp.http import add_mcp_routes

            def add_mcp(app: web.Application) -> None:
                add_mcp_routes(app, self)  # a FrontDoor started and stopped with the HTTP API's app

            routes.append(add_mcp)
        routes.append(lambda app: add_console_routes(app, self))
        if self.dev_issuer is not None:
            from bastion.console.devlogin import add_routes as add_dev_login_routes

            routes.append(add_dev_login_routes)  # the dev issuer's sign-in page for the console
        return routes

    async def _start_demo(self) -> None:
        from bastion.demo.sshtarget import DemoTarget

        demo_host_key = load_or_create_key(self.config.data_dir / "demo_host_key")
        self.demo = demo_target = DemoTarget(demo_host_key, trusted_ca=self.target_ca)
        await demo_target.start()
        demo = TargetConfig(name=DEMO_TARGET, host="127.0.0.1", port=demo_target.port, logins=(_local_user(),),
                            default_login=_local_user(), host_keys=(demo_host_key.export_public_key().decode(),),
                            credential="ca")
        self.config = replace(self.config, targets=(*self.config.targets, demo))

    async def stop(self) -> None:
        for door in self.doors:
            await door.stop_accepting()  # done already after a drain
        self.live.terminate_all(lifecycle.end_message(self))
        await self.live.wait_empty(5.0)
        for door in reversed(self.doors):
            await door.stop()  # after their sessions were ended, before the recorder closes
        await self.approvals.stop()  # pending requests of sessions still waiting: cancelled
        await self.control.stop()
        await self.recorder.close()
        await self.live.settle()
        await self.archive.stop()
        await self.state.close()
        await self.verifier.close()
        if self.http is not None:
            await self.http.stop()
        if self.demo is not None:
            await self.demo.stop()
        self.audit.close()

    def handle_signals(self) -> None:
        """SIGTERM/SIGINT drain, SIGHUP reloads. Installed before the banner says the gateway
        is up, so a signal sent on seeing it is never the ignored one (bastion/cli.py)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop_signal)
        loop.add_signal_handler(signal.SIGHUP, lambda: lifecycle.reload(self))

    async def run_forever(self) -> None:
        self.handle_signals()
        await self.stopping.wait()
        await lifecycle.drain(self)
        await self.stop()

    def _stop_signal(self) -> None:
        if self.stopping.is_set():
            self.hurry.set()  # a second SIGTERM / Ctrl-C: no more grace
        self.stopping.set()


def _local_user() -> str:
    import getpass

    return getpass.getuser()
