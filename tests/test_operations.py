"""Operating the gateway: /metrics, /healthz, /readyz, JSON logs, SIGHUP and the SIGTERM drain.

Real parts only: OpenSSH clients and sshd targets, the Node OIDC provider, moto_server for
S3 with Object Lock, PostgreSQL for two replicas. Every wait is a deadline-bound poll on
something observable (a scrape, a log line, the terminal), never a sleep.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from recorder import RecordingKey
from recorder.s3store import S3Store
from replay.reader import iter_events, open_session
from tests.conftest import (
    AUDIENCE,
    GatewayProcess,
    Targets,
    gateway_config,
    target_block,
    toml_list,
    toml_str,
    wait_for,
)
from tests.support import postgres
from tests.support.moto import MotoServer, set_aws_env
from tests.support.oidc import OIDCProvider
from tests.support.openssh import PtySsh, run_ssh

ROOT = Path(__file__).resolve().parent.parent
PROMPT = rb"\[gw\]\$ "

# -- helpers -----------------------------------------------------------------------------------


def http(url: str, token: str | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(url: str, token: str | None = None) -> tuple[int, dict[str, Any]]:
    status, body = http(url, token)
    return status, json.loads(body)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(gw: GatewayProcess, token: str | None = None) -> Samples:
    status, body = http(gw.http_url + "/metrics", token)
    assert status == 200, body[:500]
    out: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def dest(gw: GatewayProcess, user: str) -> list[str]:
    return ["-p", str(gw.ssh_port), f"{user}@127.0.0.1"]


def set_prompt(pty: PtySsh) -> None:
    pty.expect(rb"[$#] ", timeout=15)
    pty.send(b"PS1='[gw]''$ '\r")
    pty.expect(PROMPT)


def run_in_shell(pty: PtySsh, line: bytes, pattern: bytes) -> None:
    pty.send(line + b"\r")
    pty.expect(pattern)
    pty.expect(PROMPT)


def log_records(gw: GatewayProcess) -> list[dict[str, Any]]:
    """The gateway's stderr, one JSON object per line (the log is JSON when not a terminal)."""
    return [json.loads(line) for line in gw.log_text().splitlines() if line.strip()]


def wait_log(gw: GatewayProcess, predicate: Callable[[dict[str, Any]], bool], what: str,
             since: int = 0, timeout: float = 15) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((r for r in log_records(gw)[since:] if predicate(r)), None)

    try:
        return wait_for(find, timeout, what)
    except TimeoutError:
        raise AssertionError(f"no log record: {what}\n{gw.log_text()[-3000:]}") from None


def ssh_accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.settimeout(2)
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


def access_block(name: str, groups: list[str], targets: list[str]) -> str:
    return "\n".join(["[[access]]", f"name = {toml_str(name)}", f"groups = {toml_list(groups)}",
                      f"targets = {toml_list(targets)}", ""])


# -- /metrics during sessions ----------------------------------------------------------------------


def test_metrics_move_with_sessions_auth_failures_and_bytes(gateway: GatewayProcess, oidc: OIDCProvider,
                                                            targets: Targets) -> None:
    # Sessions of earlier tests on this gateway have all ended.
    wait_for(lambda: value(scrape(gateway), "guarita_sessions_active", front_door="ssh") == 0, 15,
             "no live session before the test")
    before = scrape(gateway)
    for name in ("guarita_spool_bytes", "guarita_uploads_pending", "guarita_upload_lag_seconds",
                 "guarita_upload_errors_total", "guarita_approvals_pending", "guarita_store_up"):
        assert (name, frozenset()) in before, name

    # Credentials refused: by the HTTP API and by the SSH front door, each with its reason.
    status, _ = http(gateway.http_url + "/v1/whoami", token="not.a.jwt")
    assert status == 401
    refused = run_ssh(["-o", "NumberOfPasswordPrompts=1", *dest(gateway, f"{targets.login}@web-key"), "true"],
                      token="garbage-token")
    assert refused.returncode == 255
    # A session refused before it opens.
    unknown = run_ssh([*dest(gateway, f"{targets.login}@no-such-target"), "true"], token=oidc.token("agent-sre"))
    assert unknown.returncode == 255 and b"unknown target" in unknown.stderr

    after_refusals = scrape(gateway)
    assert value(after_refusals, "guarita_auth_failures_total", front_door="api", reason="malformed") == \
        value(before, "guarita_auth_failures_total", front_door="api", reason="malformed") + 1
    assert value(after_refusals, "guarita_auth_failures_total", front_door="ssh", reason="malformed") >= \
        value(before, "guarita_auth_failures_total", front_door="ssh", reason="malformed") + 1
    assert value(after_refusals, "guarita_sessions_refused_total", front_door="ssh", reason="unknown_target") == \
        value(before, "guarita_sessions_refused_total", front_door="ssh", reason="unknown_target") + 1

    with PtySsh(["-tt", *dest(gateway, f"{targets.login}@web-key")], token=oidc.token("agent-sre")) as pty:
        set_prompt(pty)
        live = scrape(gateway)
        assert value(live, "guarita_sessions_active", front_door="ssh") == 1
        assert value(live, "guarita_sessions_started_total", front_door="ssh") == \
            value(before, "guarita_sessions_started_total", front_door="ssh") + 1
        out_before = value(live, "guarita_relayed_bytes_total", front_door="ssh", direction="out")
        in_before = value(live, "guarita_relayed_bytes_total", front_door="ssh", direction="in")
        assert out_before > value(before, "guarita_relayed_bytes_total", front_door="ssh", direction="out")
        line = b"head -c 30000 /dev/zero | tr '\\0' x | fold -w 100; echo; echo done-$((40+2))"
        run_in_shell(pty, line, rb"\ndone-42\r\n")
        grown = scrape(gateway)
        assert value(grown, "guarita_relayed_bytes_total", front_door="ssh", direction="out") >= out_before + 30000
        assert value(grown, "guarita_relayed_bytes_total", front_door="ssh", direction="in") >= in_before + len(line)
        assert value(grown, "guarita_recordings_open") >= 1
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0

    def ended() -> Samples | None:
        samples = scrape(gateway)
        return samples if value(samples, "guarita_sessions_active", front_door="ssh") == 0 else None

    done = wait_for(ended, 15, "the session to end")
    assert value(done, "guarita_sessions_total", front_door="ssh", outcome="ok") == \
        value(before, "guarita_sessions_total", front_door="ssh", outcome="ok") + 1
    # Relayed bytes of ended sessions stay counted.
    assert value(done, "guarita_relayed_bytes_total", front_door="ssh", direction="out") >= out_before + 30000
    assert value(done, "guarita_audit_events_total", event="session.start") >= 1


# -- health, readiness and the JSON log -------------------------------------------------------------


def _s3_config(data_dir: str, bucket: str, oidc: OIDCProvider, targets: Targets, extra_gateway: str = "",
               state: str | None = None, key_file: Path | None = None, access: str | None = None) -> str:
    t = targets
    lines = [
        "[gateway]",
        f"data_dir = {toml_str(data_dir)}",
        f"audit_log = {toml_str(data_dir + '/audit.jsonl')}",
        extra_gateway,
        "",
        "[recording]",
        f"url = {toml_str(f's3://{bucket}/rec')}",
        'segment_seconds = "1s"',
        'retention = "1d"',
    ]
    if key_file is not None:
        lines.append(f"key_file = {toml_str(str(key_file))}")
    if state is not None:
        lines += ["", "[state]", f"url = {toml_str(state)}"]
    lines += ["", "[[oidc]]", f"issuer = {toml_str(oidc.issuer)}", f"audience = {toml_str(AUDIENCE)}",
              'leeway = "5s"', "",
              target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key),
              access if access is not None else access_block("sre everywhere", ["sre"], ["*"])]
    return "\n".join(lines)


def test_health_readiness_follow_the_store_and_the_log_is_json(
        tmp_path: Path, oidc: OIDCProvider, targets: Targets, start_gateway: Callable[..., GatewayProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    moto = MotoServer(tmp_path / "moto", record=True).start()
    try:
        set_aws_env(monkeypatch, moto.url, tmp_path)
        bucket = moto.make_bucket(lock=True)
        gw = start_gateway(_s3_config("{data_dir}", bucket, oidc, targets))
        assert http_json(gw.http_url + "/healthz") == (200, {"status": "ok", "draining": False})
        status, ready = http_json(gw.http_url + "/readyz")
        assert status == 200, ready
        assert ready == {"ready": True, "draining": False, "problems": {},
                         "checks": {"recordings": True, "state": True, "oidc_keys": True}}

        moto.stop()  # the recordings store goes away: not ready (within the check's cache time)

        def not_ready() -> dict[str, Any] | None:
            status, body = http_json(gw.http_url + "/readyz")
            return body if status == 503 else None

        body = wait_for(not_ready, 20, "/readyz 503 while the store is down")
        assert body["checks"] == {"recordings": False, "state": True, "oidc_keys": True}
        assert "cannot reach" in body["problems"]["recordings"], body
        assert http_json(gw.http_url + "/healthz")[0] == 200  # alive all the same

        moto.restart()  # back, with its bucket (moto's request log replayed)
        wait_for(lambda: http_json(gw.http_url + "/readyz")[0] == 200, 20, "/readyz 200 once the store is back")

        # The log: one JSON object per line, each with time, level, logger and message.
        records = log_records(gw)
        assert records
        for record in records:
            assert {"ts", "level", "logger", "message"} <= record.keys(), record
        assert any(r["logger"] == "guarita" and r["message"].startswith("guarita is listening") for r in records)
    finally:
        moto.stop()


def test_log_format_text_and_json_formatters() -> None:
    import io
    import logging

    from bastion.logs import current_session, setup_logging

    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        for fmt in ("json", "text"):
            buf = io.StringIO()
            assert setup_logging(fmt, stream=buf) == fmt
            token = current_session.set("20261125-081106-ab12cd34")
            try:
                logging.getLogger("guarita.test").warning("hello %s", "world", extra={"target": "web-1"})
            finally:
                current_session.reset(token)
            line = buf.getvalue().strip()
            if fmt == "json":
                record = json.loads(line)
                assert record["message"] == "hello world" and record["level"] == "warning"
                assert record["logger"] == "guarita.test" and record["target"] == "web-1"
                assert record["session"] == "20261125-081106-ab12cd34"
            else:
                assert "WARNING guarita.test: hello world" in line
                assert "session=20261125-081106-ab12cd34" in line and "target=web-1" in line
        # auto: JSON when stderr is not a terminal (it is a StringIO here)
        assert setup_logging("auto", stream=io.StringIO()) == "json"
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])


# -- SIGHUP -------------------------------------------------------------------------------------


def test_sighup_reloads_rules_without_dropping_a_live_session(
        tmp_path: Path, oidc: OIDCProvider, targets: Targets,
        start_gateway: Callable[..., GatewayProcess]) -> None:
    t = targets
    target_text = target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key",
                               t.gateway_key)
    roles = '\n[roles]\noperators = { groups = ["sre"] }\n'

    data_dir = tmp_path / "gw"
    data_dir.mkdir()

    def config(access: str, extra_gateway: str, segment_seconds: str = "1s") -> str:
        return gateway_config(data_dir, [(oidc.issuer, "5s")], target_text, access + roles,
                              segment_seconds=segment_seconds, extra_gateway=extra_gateway)

    gw = start_gateway(config(access_block("sre everywhere", ["sre"], ["*"]), "metrics_public = false"),
                       data_dir=data_dir)
    sre, ci = oidc.token("agent-sre"), oidc.token("agent-ci")
    # Metrics are not public here: an operator's token reads them, an agent's does not.
    assert http(gw.http_url + "/metrics")[0] == 401
    assert http(gw.http_url + "/metrics", ci)[0] == 403
    assert http(gw.http_url + "/metrics", sre)[0] == 200

    with PtySsh(["-tt", *dest(gw, f"{t.login}@web-key")], token=sre) as pty:
        set_prompt(pty)
        mark, audit = len(log_records(gw)), gw.audit_mark()
        # sre loses web-key; metrics become public; a key that needs a restart changes too.
        gw.config_path.write_text(config(access_block("ci only", ["ci"], ["web-key"]), "metrics_public = true",
                                         segment_seconds="2s"))
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGHUP)
        reloaded = wait_log(gw, lambda r: r["message"].startswith("SIGHUP: reloaded"), "reload", since=mark)
        assert set(reloaded["applied"]) == {"access", "gateway.metrics_public"}, reloaded
        assert reloaded["restart_needed"] == ["recording.segment_seconds"], reloaded
        gw.wait_audit("config.reloaded", since=audit)

        # New sessions follow the new rules at once...
        denied = run_ssh([*dest(gw, f"{t.login}@web-key"), "true"], token=sre)
        assert denied.returncode == 255 and b"no access rule" in denied.stderr, denied.stderr
        allowed = run_ssh([*dest(gw, f"{t.login}@web-key"), "echo ci-ok"], token=ci)
        assert allowed.returncode == 0 and allowed.stdout == b"ci-ok\n", allowed.stderr
        assert http(gw.http_url + "/metrics")[0] == 200
        # ...and the live session goes on.
        run_in_shell(pty, b"echo still-$((2*21))", rb"\rstill-42\r\n")

        # An invalid file changes nothing: the problems are logged, the running rules stay.
        mark = len(log_records(gw))
        gw.config_path.write_text(gw.config_path.read_text() + "\n[gateway_typo]\nx = 1\n")
        os.kill(gw.proc.pid, signal.SIGHUP)
        failed = wait_log(gw, lambda r: "the running configuration stays" in r["message"], "invalid reload",
                          since=mark)
        assert failed["level"] == "error" and any("gateway_typo" in p for p in failed["problems"]), failed
        assert run_ssh([*dest(gw, f"{t.login}@web-key"), "echo again"], token=ci).returncode == 0
        run_in_shell(pty, b"echo alive-$((3*3))", rb"\ralive-9\r\n")
        pty.send(b"exit\r")
        assert pty.wait(timeout=15) == 0

    samples = scrape(gw)
    assert value(samples, "guarita_config_reloads_total", result="applied") == 1
    assert value(samples, "guarita_config_reloads_total", result="invalid") == 1


# -- two replicas, SIGTERM drain ------------------------------------------------------------------


@pytest.mark.skipif(not postgres.available(), reason="PostgreSQL (initdb, pg_ctl, user postgres) is not installed")
def test_two_replicas_sigterm_drains_one_while_the_other_serves(
        tmp_path: Path, oidc: OIDCProvider, targets: Targets, start_gateway: Callable[..., GatewayProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    t = targets
    pg = postgres.PostgresCluster().start()
    moto = MotoServer(tmp_path / "moto", record=False).start()
    replicas: list[GatewayProcess] = []
    try:
        set_aws_env(monkeypatch, moto.url, tmp_path)
        bucket = moto.make_bucket(lock=True)
        key_file = tmp_path / "recording_key.pem"  # one recording key for both replicas
        RecordingKey.load_or_create(key_file)
        text = _s3_config("{data_dir}", bucket, oidc, t, extra_gateway='drain_grace = "3s"', state=pg.url,
                          key_file=key_file)
        a = start_gateway(text, data_dir=tmp_path / "replica-a")
        replicas.append(a)
        b = start_gateway(text, data_dir=tmp_path / "replica-b")
        replicas.append(b)
        token = oidc.token("agent-sre")
        for gw in (a, b):
            r = run_ssh([*dest(gw, f"{t.login}@web-key"), "echo via-$((1+1))"], token=token)
            assert r.returncode == 0 and r.stdout == b"via-2\n", r.stderr
            assert http_json(gw.http_url + "/readyz")[0] == 200

        audit = a.audit_mark()
        with PtySsh(["-tt", *dest(a, f"{t.login}@web-key")], token=token) as pty:
            set_prompt(pty)
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)
            pty.expect(rb"guarita: this gateway is shutting down; your session ends in 3s\r\n")
            # At once: not ready (the load balancer stops sending), no new SSH connections.
            status, body = http_json(a.http_url + "/readyz")
            assert status == 503 and body["draining"] is True, body
            assert http_json(a.http_url + "/healthz") == (200, {"status": "ok", "draining": True})
            assert not ssh_accepts(a.ssh_port)
            # The grace period is real: the session still works...
            run_in_shell(pty, b"echo grace-$((5+5))", rb"\rgrace-10\r\n")
            # ...then the gateway ends it, and says why.
            assert pty.wait(timeout=20) == 255
            assert b"the session was ended after its 3s grace period" in pty.output()
        assert a.proc.wait(timeout=30) == 0
        sid = next(e["session"] for e in a.audit_events(audit) if e.get("event") == "session.start")

        # The recording is sealed and uploaded, signed, under Object Lock.
        pem = tmp_path / "recording.pub.pem"
        pem.write_text(RecordingKey.load_or_create(key_file).public_pem())
        verify = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", f"s3://{bucket}/rec", "verify",
                                 sid, "--public-key", str(pem), "--lock-mode", "COMPLIANCE"],
                                capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert verify.returncode == 0, verify.stdout + verify.stderr
        assert verify.stdout.strip().startswith(f"{sid}: OK"), verify.stdout
        store = S3Store.from_url(f"s3://{bucket}/rec", retention=86400)
        events = list(iter_events(store, open_session(store, sid)))
        markers = [e.data.get("type") for e in events if e.code == "m"]
        assert "notice" in markers and "terminated" in markers, markers
        assert not [p for p in (a.data_dir / "spool").iterdir() if not p.name.startswith(".")]

        # The other replica never stopped serving.
        r = run_ssh([*dest(b, f"{t.login}@web-key"), "echo still-served"], token=token)
        assert r.returncode == 0 and r.stdout == b"still-served\n", r.stderr
        assert http_json(b.http_url + "/readyz")[0] == 200
        assert value(scrape(b), "guarita_sessions_total", front_door="ssh", outcome="ok") >= 2
        assert b.stop() == 0
    finally:
        for gw in replicas:
            gw.stop()  # before the store and the database they need to stop cleanly
        moto.stop()
        pg.stop()


# -- the registry itself -------------------------------------------------------------------------


def test_each_gateway_has_its_own_registry_fed_by_the_audit_stream() -> None:
    from types import SimpleNamespace

    from bastion.metrics import Metrics

    def parse(m: Metrics) -> Samples:
        out: Samples = {}
        for family in text_string_to_metric_families(m.render().decode()):
            for sample in family.samples:
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
        return out

    def services() -> SimpleNamespace:  # a gateway with none of the parts read at scrape time
        return SimpleNamespace(readiness=None, state=None, recorder=None, approvals=None, draining=False, kube=None)

    one, two = Metrics(services()), Metrics(services())
    one.on_audit("auth.failure", {"method": "password", "reason": "expired"})
    one.on_audit("auth.failure", {"method": "bearer", "front_door": "kube", "reason": "bad_signature"})
    one.on_audit("auth.failure", {"method": "bearer", "path": "/v1/whoami", "reason": "missing_token"})
    one.on_audit("approval.requested", {"request": "r1"})
    one.on_audit("approval.resolved", {"request": "r1", "status": "approved"})
    one.on_audit("approval.expired", {"request": "r2"})
    one.on_audit("session.refused", {"reason": "access_denied"})
    one.masked("cpf", 2)
    one.masked("email")
    a, b = parse(one), parse(two)
    assert value(a, "guarita_auth_failures_total", front_door="ssh", reason="expired") == 1
    assert value(a, "guarita_auth_failures_total", front_door="kube", reason="bad_signature") == 1
    assert value(a, "guarita_auth_failures_total", front_door="api", reason="missing_token") == 1
    assert value(a, "guarita_approval_requests_total") == 1
    assert value(a, "guarita_approvals_decided_total", decision="approved") == 1
    assert value(a, "guarita_approvals_decided_total", decision="expired") == 1
    assert value(a, "guarita_sessions_refused_total", front_door="ssh", reason="access_denied") == 1
    assert value(a, "guarita_masked_values_total", detector="cpf") == 2
    assert value(a, "guarita_masked_values_total", detector="email") == 1
    assert value(a, "guarita_audit_events_total", event="auth.failure") == 3
    # Nothing leaks into the other gateway's registry, nor into the process-wide one.
    assert value(b, "guarita_auth_failures_total", front_door="ssh", reason="expired") == 0
    assert value(b, "guarita_masked_values_total", detector="cpf") == 0
    from prometheus_client import REGISTRY

    assert REGISTRY.get_sample_value("guarita_masked_values_total", {"detector": "cpf"}) is None
