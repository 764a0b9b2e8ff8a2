"""Three gateway replicas for real: behind HAProxy (mode tcp, round robin), on one PostgreSQL
and one S3 endpoint (moto_server with Object Lock).

* sessions opened through the load balancer spread over the three replicas;
* a lock through one replica ends the subject's sessions on all of them;
* an approval given through one replica wakes the session waiting on another;
* a replica SIGKILLed mid-session loses at most its flush interval of recording once it
  is started again (its spool is sealed and uploaded at the next start);
* the archive index that the three filled live gives the scan's answers.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from recorder.s3store import S3Store
from replay.reader import iter_events, open_session
from tests.conftest import (
    GatewayProcess,
    Targets,
    check_config,
    gateway_config,
    target_block,
    wait_for,
)
from tests.support import postgres
from tests.support.approvals import BackgroundSsh
from tests.support.moto import MotoServer, aws_env
from tests.support.oidc import OIDCProvider
from tests.support.openssh import _kill_group, _prepare_ssh, free_port
from tests.test_identity_lifecycle import LiveSsh, api, live

FLUSH_INTERVAL = 1.0
LOCK_REASON = "rotation of contractors"
RULES = """
[roles]
operators = { groups = ["sre"] }
auditors = { groups = ["sre"] }

[[approvals]]
name = "destructive"
pattern = "needs-approval"
approvers = ["sre"]
timeout = "60s"
"""


class S3Gateway(GatewayProcess):
    """A replica whose recordings go to moto (credentials and endpoint in its environment)."""

    env: dict[str, str] = {}

    def _environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.env}


@dataclass
class Cluster:
    gateways: list[S3Gateway]
    lb_port: int
    pg_url: str
    recordings: str
    env: dict[str, str]
    store: S3Store


def _config(data_dir: Path, name: str, oidc: OIDCProvider, targets: Targets, pg_url: str, recordings: str) -> Path:
    t = targets
    blocks = target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key)
    access = '[[access]]\nname = "everyone"\nsubjects = ["*"]\ntargets = ["*"]\n' + RULES + (
        f'\n[state]\nurl = "{pg_url}"\nreplica = "replica-{name}"\n')
    text = gateway_config(data_dir, [(oidc.issuer, "5s")], blocks, access)  # type: ignore[list-item]
    text = re.sub(r'(?m)^url = "file://[^"]*/recordings"$', f'url = "{recordings}"\nflush_interval = "1s"', text)
    assert recordings in text
    data_dir.mkdir(parents=True, exist_ok=True)
    path = data_dir / "guarita.toml"
    path.write_text(text)
    return path


def _haproxy(workdir: Path, ports: list[int]) -> tuple[subprocess.Popen[bytes], int]:
    lb_port = free_port()
    servers = "\n".join(f"  server gw{i} 127.0.0.1:{p}" for i, p in enumerate(ports))
    config = workdir / "haproxy.cfg"
    config.write_text(f"""global
  maxconn 2000
defaults
  mode tcp
  timeout connect 5s
  timeout client 1h
  timeout server 1h
frontend ssh
  bind 127.0.0.1:{lb_port}
  default_backend gateways
backend gateways
  balance roundrobin
{servers}
""")
    log = open(workdir / "haproxy.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()

    def listening() -> bool:
        assert proc.poll() is None, (workdir / "haproxy.log").read_text()
        import socket

        try:
            socket.create_connection(("127.0.0.1", lb_port), timeout=1).close()
            return True
        except OSError:
            return False

    wait_for(listening, 15, "haproxy to listen")
    return proc, lb_port


@pytest.fixture(scope="module")
def cluster(oidc: OIDCProvider, targets: Targets, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if not postgres.available():
        pytest.skip("PostgreSQL 15 binaries are not installed")
    tmp = tmp_path_factory.mktemp("replicas")
    moto = MotoServer(tmp / "moto", record=False).start()
    gateways: list[S3Gateway] = []
    lb: subprocess.Popen[bytes] | None = None
    try:
        with postgres.PostgresCluster() as pg:
            bucket = moto.make_bucket()
            recordings = f"s3://{bucket}/rec"
            env = aws_env(moto.url, tmp)
            S3Gateway.env = env
            for name in ("a", "b", "c"):
                path = _config(tmp / name, name, oidc, targets, pg.url, recordings)
                checked = check_config(path)
                assert checked.returncode == 0, checked.stdout + checked.stderr
                gateways.append(S3Gateway(path, tmp / name))
            starters = [threading.Thread(target=gw.start) for gw in gateways]
            for th in starters:
                th.start()
            for th in starters:
                th.join(90)
            assert all(gw.proc is not None and gw.proc.poll() is None for gw in gateways), \
                [gw.log_text()[-2000:] for gw in gateways]
            lb, lb_port = _haproxy(tmp, [gw.ssh_port for gw in gateways])
            store = S3Store(bucket, "rec", endpoint_url=moto.url, client=moto.client())
            yield Cluster(gateways, lb_port, pg.url, recordings, env, store)
    finally:
        if lb is not None:
            _kill_group(lb)  # type: ignore[arg-type]
        for gw in gateways:
            gw.stop()
        moto.stop()


def _via_lb(c: Cluster, login: str) -> list[str]:
    return ["-p", str(c.lb_port), f"{login}@web-key@127.0.0.1"]


def test_sessions_spread_and_a_lock_through_one_replica_ends_them_on_all(
        cluster: Cluster, oidc: OIDCProvider, targets: Targets, tmp_path: Path) -> None:
    c = cluster
    who, sre = oidc.token("agent-nobody"), oidc.token("agent-sre")
    sessions = [LiveSsh([*_via_lb(c, targets.login), "sleep 120"], who, tmp_path) for _ in range(6)]
    body: dict = {}
    try:
        rows = live(c.gateways[0], sre, "agent-nobody", 6, timeout=30)
        assert {r["replica"] for r in rows} == {"replica-a", "replica-b", "replica-c"}, rows
        status, body = api(c.gateways[2], "/v1/locks", sre,
                           {"kind": "subject", "value": "agent-nobody", "reason": LOCK_REASON})
        returned = time.monotonic()
        assert status == 201 and body["live_sessions"] == 6, body
        for s in sessions:
            s.join(timeout=15)
        closed = max(s.ended for s in sessions)  # type: ignore[type-var]
        print(f"\nlock through replica c -> 6 sessions on 3 replicas closed in {1000 * (closed - returned):.0f} ms")
        for s in sessions:
            assert s.proc.returncode == 255 and LOCK_REASON.encode() in s.err, s.err
    finally:
        for s in sessions:
            s.close()
        if body.get("lock"):
            api(c.gateways[0], f"/v1/locks/{body['lock']['id']}", sre, method="DELETE")


def _requested_on(c: Cluster, marks: list[int], command: str) -> tuple[int, str]:
    def find() -> tuple[int, str] | None:
        for i, gw in enumerate(c.gateways):
            for e in gw.audit_events(marks[i]):
                if e.get("event") == "approval.requested" and e.get("command") == command:
                    return i, str(e["request"])
        return None

    return wait_for(find, 30, f"an approval request for {command!r} on some replica")


def test_an_approval_on_one_replica_wakes_the_session_on_another(cluster: Cluster, oidc: OIDCProvider,
                                                                   targets: Targets) -> None:
    c = cluster
    for n in range(2):  # round robin: the two requests wait on different replicas
        command = f"echo needs-approval-{n}-$((40+2))"
        marks = [gw.audit_mark() for gw in c.gateways]
        job = BackgroundSsh([*_via_lb(c, targets.login), command], oidc.token("agent-ci"))
        holder, rid = _requested_on(c, marks, command)
        other = c.gateways[(holder + 1) % 3]
        status, body = api(other, f"/v1/approvals/{rid}/approve", oidc.token("agent-sre"), {"reason": "ok"})
        assert status == 200, body
        r = job.join()
        assert (r.returncode, r.stdout) == (0, f"needs-approval-{n}-42\n".encode()), r.stderr


class StreamingSsh:
    """ssh whose output lines are timestamped as they arrive."""

    def __init__(self, args: list[str], token: str, workdir: Path) -> None:
        cmd, env = _prepare_ssh(args, token=token, identity=None, env=None, tmpdir=workdir)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").strip()))

    def close(self) -> None:
        if self.proc.poll() is None:
            _kill_group(self.proc)  # type: ignore[arg-type]
        self._thread.join(10)


def test_a_sigkilled_replica_loses_at_most_its_flush_interval(cluster: Cluster, oidc: OIDCProvider,
                                                               targets: Targets, tmp_path: Path) -> None:
    c = cluster
    victim = c.gateways[1]
    mark = victim.audit_mark()
    command = "for i in $(seq 1 100000); do echo line-$i; sleep 0.02; done"
    ssh = StreamingSsh(["-p", str(victim.ssh_port), f"{targets.login}@web-key@127.0.0.1", command],
                       oidc.token("agent-ci"), tmp_path)
    try:
        wait_for(lambda: len(ssh.lines) >= 150, 30, "output flowing through the replica")
        assert victim.proc is not None
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        victim.proc.wait(timeout=10)
        victim.proc = None
    finally:
        ssh.close()
    sid = victim.wait_audit("session.start", mark, command=command)["session"]
    seen_before = [text for t, text in ssh.lines if t < killed - FLUSH_INTERVAL - 0.5 and text.startswith("line-")]
    assert len(seen_before) >= 50
    victim.start()  # recovery seals the session from the spool and uploads it
    wait_for(lambda: _has_manifest(c.store, sid), 30, "the recovered session's manifest in S3")
    summary = open_session(c.store, sid)
    assert summary.state == "recovered"
    recorded = b"".join(e.stream_bytes() or b"" for e in iter_events(c.store, summary) if e.stream == "o")
    lines = set(recorded.decode(errors="replace").split())
    missing = [line for line in seen_before if line not in lines]
    assert not missing, f"lost {len(missing)} lines seen more than {FLUSH_INTERVAL}s before the kill: {missing[:5]}"
    verified = _replay(c, "verify", sid, "--config", str(victim.config_path))
    assert verified.returncode == 0, verified.stdout + verified.stderr

    # The archive index the three replicas filled as they stored sessions answers like a scan.
    wait_for(lambda: sid in _replay(c, "ls", "--json", "--state", c.pg_url).stdout, 30,
             "the recovered session in the archive index")
    # (Queries this test's own session answers: under xdist the other tests of this module may
    # run on another worker, with another cluster.)
    for query in (["ls", "--json"], ["search", "--json", "--commands-only", "seq 1 100000"]):
        scan = _replay(c, *query)
        indexed = _replay(c, *query, "--state", c.pg_url)
        assert (indexed.returncode, indexed.stdout) == (scan.returncode, scan.stdout), query
        assert scan.stdout.strip()


def _has_manifest(store: S3Store, sid: str) -> bool:
    try:
        return open_session(store, sid).complete
    except Exception:  # noqa: BLE001 - not there yet
        return False


def _replay(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **c.env}
    return subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", c.recordings, *args],
                          capture_output=True, text=True, env=env, timeout=120)
