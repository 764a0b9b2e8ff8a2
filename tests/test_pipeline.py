"""The session pipeline's admission (bastion/pipeline.py), with a fake front door
(``ClientSide``) and no gateway: small services, a real recorder on a temporary spool."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from bastion.approvals.engine import GateResult
from bastion.config import load_config
from bastion.control import Control, SessionLimits
from bastion.doors.kube.held import HeldStream
from bastion.doors.kube.policy import authorize_kube, parse_path
from bastion.identity import Identity
from bastion.live import LiveSessions
from bastion.pipeline import EarlyInput, GateRefused, admit, open_session
from bastion.refusal import Refused
from bastion.session import SessionInfo
from recorder import Recorder, RecordingKey, open_store

IDENTITY = Identity("https://issuer.invalid", "agent", ("sre",))


class FakeClient:
    """A front door's side of a session, as a list of what the pipeline asked of it."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.notices: list[str] = []
        self.terminated: list[str] = []

    def write_client(self, data: bytes) -> None:
        self.written.append(data)

    def deliver_output(self, data: bytes, stream: str) -> None:
        self.written.append(data)

    def notify_user(self, text: str) -> None:
        self.notices.append(text)

    def terminate(self, message: str) -> None:
        self.terminated.append(message)


class Audit:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def emit(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    def named(self, event: str) -> list[dict[str, Any]]:
        return [f for e, f in self.events if e == event]


class Rows:
    """Live-session rows: adding is slow (a busy database), removing is fast."""

    def __init__(self) -> None:
        self.rows: set[str] = set()
        self.ops: list[tuple[str, str]] = []

    async def add_live_session(self, values: dict[str, Any]) -> None:
        await asyncio.sleep(0.05)
        self.rows.add(values["id"])
        self.ops.append(("add", values["id"]))

    async def remove_live_session(self, session_id: str) -> None:
        self.rows.discard(session_id)
        self.ops.append(("remove", session_id))

    async def update_live_sessions(self, counts: list[tuple[str, int, int]]) -> None:
        pass


class Admitter:
    def __init__(self, refuse: Refused | None = None) -> None:
        self.refuse = refuse
        self.taken: set[str] = set()
        self.asked = 0

    def admit(self, identity: Identity, target: str | None, key: str) -> Refused | None:
        self.asked += 1
        if self.refuse is None:
            self.taken.add(key)
        return self.refuse

    def release(self, key: str) -> None:
        self.taken.discard(key)

    def session_started(self, session: Any) -> None:
        pass

    def session_ended(self, session: Any) -> None:
        self.taken.discard(session.id)

    def limits_for(self, info: SessionInfo) -> SessionLimits:
        return SessionLimits()


class Approvals:
    """Holds every exec command until the session cancels the wait (Ctrl-C)."""

    def gates_opening(self, info: SessionInfo, argv: list[str] | None = None) -> bool:
        return info.kind == "exec"

    async def check(self, session: Any, command: str, kind: str, **_: Any) -> GateResult:
        session.approval_cancel = asyncio.Event()
        session.say("guarita: waiting for approval (request r-1)")
        await session.approval_cancel.wait()
        session.approval_cancel = None
        return GateResult(False, "cancelled", f"the request was {session.cancel_reason}")

    def session_started(self, session: Any) -> None:
        pass

    def session_ended(self, session: Any) -> None:
        session.cancel_approval("the session ended")

    def watches(self, session: Any) -> bool:
        return False


def _services(tmp: Path, spool: Path | None = None, policy: str = "strict", **over: Any) -> SimpleNamespace:
    rows = Rows()
    recorder = Recorder(open_store((tmp / "recordings").as_uri(), "COMPLIANCE", 60), spool or tmp / "spool",
                        RecordingKey.load_or_create(tmp / "key.pem"), failure_policy=policy, spool_budget=over.pop(
                            "spool_budget", None))
    services = SimpleNamespace(
        draining=False, audit=Audit(), recorder=recorder, control=Admitter(), approvals=None, rows=rows,
        metrics=None, masking_secret=None, interactive_gate=None, line_gate=None,
        live=LiveSessions(lambda: rows),
        config=SimpleNamespace(masking=None, recording=SimpleNamespace(failure_policy=policy)))
    for key, value in over.items():
        setattr(services, key, value)
    return services


def _info(kind: str = "exec", command: str | None = "uptime") -> SessionInfo:
    return SessionInfo(front_door="test", identity=IDENTITY, source="127.0.0.1:1", target="db", kind=kind,
                       command=command)


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_session_opens_is_registered_and_its_row_goes_after_it_came(tmp_path: Path) -> None:
    async def scenario() -> None:
        services = _services(tmp_path)
        await services.recorder.start()
        client = FakeClient()
        session = await open_session(services, _info(), client)
        assert services.live.sessions == {session.id: session}
        # The gateway ends it (a lock, a kill): through the door's terminate, once.
        assert session.stop("kill", "ended by an operator")
        assert client.terminated == ["ended by an operator"]
        await session.end(0)  # ends before its (slow) row was even added
        await services.live.settle()
        assert len(services.live) == 0 and services.rows.rows == set()
        assert services.rows.ops == [("add", session.id), ("remove", session.id)]
        assert [e for e, _ in services.audit.events] == ["session.start", "session.stopped", "session.end"]
        await services.recorder.close()

    _run(scenario())


def test_refusals_are_one_exception_and_one_audit_event(tmp_path: Path) -> None:
    async def scenario() -> None:
        services = _services(tmp_path, draining=True)
        with pytest.raises(Refused) as refused:
            await admit(services, _info(), FakeClient())
        assert (refused.value.reason, refused.value.status) == ("draining", 503)
        locked = Refused("locked", "agent is locked: incident 7", 403)
        services = _services(tmp_path, control=Admitter(refuse=locked))
        await services.recorder.start()
        with pytest.raises(Refused) as refused:
            await admit(services, _info(), FakeClient())
        assert refused.value is locked
        events = services.audit.named("session.refused")
        assert len(events) == 1 and events[0]["front_door"] == "test" and events[0]["reason"] == "locked"
        assert events[0]["detail"] == "agent is locked: incident 7" and events[0]["target"] == "db"
        assert len(services.live) == 0
        await services.recorder.close()

    _run(scenario())


def test_strict_refuses_before_any_byte_when_the_spool_cannot_be_written(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the spool should be")

    async def scenario(policy: str) -> tuple[SimpleNamespace, FakeClient, Any]:
        services = _services(tmp_path, spool=blocker / "spool", policy=policy)
        client = FakeClient()
        try:
            result: Any = await admit(services, _info(), client)
        except Refused as exc:
            result = exc
        return services, client, result

    services, client, refused = _run(scenario("strict"))
    assert isinstance(refused, Refused) and refused.reason == "recording_unavailable" and refused.status == 503
    assert "cannot be written" in refused.message and "unrecorded" in refused.message
    assert client.written == [] and services.control.asked == 0  # no slot taken, nothing said
    services, client, admitted = _run(scenario("best_effort"))
    assert not isinstance(admitted, Refused) and services.control.asked == 1


def test_a_spool_over_its_budget_refuses(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "waiting-upload").write_bytes(b"x" * 4096)

    async def scenario() -> Refused:
        services = _services(tmp_path, spool=spool, spool_budget=1024)
        await services.recorder.start()
        try:
            with pytest.raises(Refused) as refused:
                await admit(services, _info(), FakeClient())
        finally:
            await services.recorder.close()
        return refused.value

    assert _run(scenario()).reason == "recording_spool_full"


def test_ctrl_c_cancels_an_opening_that_waits_for_approval(tmp_path: Path) -> None:
    async def scenario() -> None:
        services = _services(tmp_path, approvals=Approvals())
        await services.recorder.start()
        client = FakeClient()
        early: EarlyInput[bytes] = EarlyInput(1024)
        early.add(b"typed ahead\n", b"typed ahead\n")
        admission = await admit(services, _info(), client, early)
        deciding = asyncio.create_task(admission.decide_opening())
        while not client.written:
            await asyncio.sleep(0.001)
        assert b"waiting for approval" in client.written[0]
        early.add(b"\x03", b"\x03")
        with pytest.raises(GateRefused) as refused:
            await deciding
        assert refused.value.outcome == "cancelled" and "Ctrl-C" in refused.value.message
        assert early.take() == [b"typed ahead\n"]  # kept in order; the Ctrl-C was the gate's
        assert admission.session is not None
        await admission.session.end(1, reason=refused.value.message)
        await services.recorder.close()

    _run(scenario())


def test_a_tunnels_limits_come_from_the_rule_that_allowed_it(tmp_path: Path) -> None:
    """Two rules reach prod/default; only the second allows port-forward. The tunnel's limits
    are the second's (none), never the first's (a 1-minute max_duration)."""
    (tmp_path / "kubeconfig").write_text("apiVersion: v1\nkind: Config\n")
    config_file = tmp_path / "guarita.toml"
    config_file.write_text(f"""
[gateway]
data_dir = "{tmp_path}"

[recording]
url = "{(tmp_path / 'recordings').as_uri()}"

[[oidc]]
issuer = "https://issuer.invalid"
audience = "guarita"

[[clusters]]
name = "prod"
kubeconfig = "{tmp_path / 'kubeconfig'}"

[[access]]
name = "short exec sessions"
groups = ["sre"]
clusters = ["prod"]
namespaces = ["default"]
max_duration = "1m"

[[access]]
name = "tunnels"
groups = ["sre"]
clusters = ["prod"]
namespaces = ["default"]
port_forward = true
""")
    config = load_config(config_file)
    req = parse_path("/clusters/prod/api/v1/namespaces/default/pods/web/portforward")
    decision = authorize_kube(config, IDENTITY, req)
    assert decision.allowed and decision.rule is not None and decision.rule.name == "tunnels"

    async def scenario() -> SessionLimits:
        gw = SimpleNamespace(config=config, live=LiveSessions(Rows), audit=Audit())
        gw.control = Control(gw)  # type: ignore[arg-type]
        held = HeldStream(gw, "portforward", IDENTITY, "127.0.0.1:1", "prod",  # type: ignore[arg-type]
                          {"namespace": "default", "pod": "web"}, lambda message: None, decision.rule)
        return gw.control.limits_for(held.info)

    limits = asyncio.run(scenario())
    assert limits.rule == "tunnels" and limits.max_duration is None
