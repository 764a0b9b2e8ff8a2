"""End to end through real parts: real ``kubectl`` (with a kubeconfig written by
``bastion kubeconfig`` and tokens from a real OIDC provider through the exec credential
plugin ``bastion token --exec-credential``) -> guarita's Kubernetes front door
(``bastion serve --config``) -> an API-server stand-in (tests/support/kubeapi.py) that
runs real processes for exec and attach and records the headers it receives.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import selectors
import shlex
import socket
import ssl
import stat
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import yaml

from recorder.store import open_store
from replay.reader import iter_events, open_session
from tests.conftest import (
    BASTION,
    bastion_bin,
    check_config,
    find_session,
    gateway_config,
    stream_bytes,
    toml_str,
    wait_for,
)
from tests.support.echo import echo_server
from tests.support.kube import KubeGateway, PtyCommand, find_kubectl, kube_env, old_kubectl
from tests.support.kubeapi import KubeAPIStandIn
from tests.support.oidc import OIDCProvider
from tests.support.openssh import free_port

GATEWAY_TOKEN = "gateway-sa-token-0123456789"
ROTATED_TOKEN = "gateway-sa-token-rotated"
pytestmark = pytest.mark.timeout(90)


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubectl() -> str:
    return find_kubectl()


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIStandIn]:
    with KubeAPIStandIn(tmp_path_factory.mktemp("standin"), tokens=(GATEWAY_TOKEN, ROTATED_TOKEN)) as api:
        yield api


def _cluster(name: str, kubeconfig: Path | None = None, extra: str = "") -> str:
    lines = ["[[clusters]]", f"name = {toml_str(name)}"]
    if kubeconfig is not None:
        lines.append(f"kubeconfig = {toml_str(str(kubeconfig))}")
    return "\n".join([*lines, extra, ""])


@pytest.fixture(scope="module")
def kgw(oidc: OIDCProvider, oidc_short: OIDCProvider, standin: KubeAPIStandIn,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeGateway]:
    data_dir = tmp_path_factory.mktemp("kubegw")
    creds = data_dir / "creds"
    creds.mkdir()
    sa = creds / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(GATEWAY_TOKEN)
    (sa / "ca.crt").write_bytes(standin.ca.pem)
    client_cert = standin.ca.issue("gateway-client", "guarita-gateway", server=False)
    clusters = "\n".join([
        _cluster("prod", standin.kubeconfig(creds / "prod.yaml", token=GATEWAY_TOKEN)),
        _cluster("old", standin.kubeconfig(creds / "old.yaml", prefix="/v4only", token=GATEWAY_TOKEN)),
        _cluster("slow", standin.kubeconfig(creds / "slow.yaml", prefix="/slow", token=GATEWAY_TOKEN),
                 'response_timeout = "1s"'),
        _cluster("down", standin.kubeconfig(creds / "down.yaml", token=GATEWAY_TOKEN,
                                            server=f"https://127.0.0.1:{free_port()}"), 'connect_timeout = "3s"'),
        _cluster("certs", standin.kubeconfig(creds / "certs.yaml", client_cert=client_cert)),
        _cluster("incluster", None, f"in_cluster = true\nservice_account_dir = {toml_str(str(sa))}"),
        _cluster("masked", standin.kubeconfig(creds / "masked.yaml", token=GATEWAY_TOKEN)),
    ])
    masking = "\n".join([
        "[masking]",
        'default_apply = "none"',
        "",
        "[[masking.rules]]",
        'clusters = ["masked"]',
        'apply = "both"',
        "",
    ])
    access = "\n".join([
        "[[access]]",
        'name = "sre on every cluster"',
        'groups = ["sre"]',
        'clusters = ["*"]',
        "",
        "[[access]]",
        'name = "org CI in prod/default, with port-forward"',
        'claims = { repository = "org/*" }',
        'clusters = ["prod"]',
        'namespaces = ["default"]',
        "port_forward = true",
        "",
        "[roles]",  # operators may lock identities (bastion/control)
        'operators = { groups = ["sre"] }',
        "",
    ])
    approvals = "\n".join([
        "[[approvals]]",
        'name = "no shutdowns in clusters"',
        'clusters = ["*"]',
        'argv_prefix = ["shutdown"]',
        'action = "deny"',
        'message = "nobody shuts pods down through guarita"',
        "",
        "[[approvals]]",
        'name = "kube four eyes"',
        'clusters = ["prod"]',
        'pattern = "kube-needs-approval"',
        'approvers = ["sre"]',
        'timeout = "60s"',
        "",
    ])
    text = gateway_config(data_dir, [(oidc.issuer, "5s"), (oidc_short.issuer, "1s")],  # type: ignore[list-item]
                          clusters, access + "\n" + approvals + "\n" + masking)
    config_path = data_dir / "guarita.toml"
    config_path.write_text(text)
    checked = check_config(config_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    gw = KubeGateway(config_path, data_dir, env={"KUBERNETES_SERVICE_HOST": "127.0.0.1",
                                                 "KUBERNETES_SERVICE_PORT": str(standin.port)})
    try:
        gw.start()
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def kubeconfigs(kgw: KubeGateway, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One kubeconfig per cluster, each written by `bastion kubeconfig` (read-only afterwards;
    in-process: test_kubeconfig_has_server_ca_and_exec_plugin runs the real command)."""
    from click.testing import CliRunner

    from bastion.cli import main

    out = {}
    folder = tmp_path_factory.mktemp("kubeconfigs")
    for name in ("prod", "old", "slow", "down", "certs", "incluster", "masked", "nosuch"):
        path = folder / f"{name}.yaml"
        result = CliRunner().invoke(main, ["kubeconfig", "--cluster", name, "--gateway", kgw.http_url,
                                           "--output", str(path), "--exec-command", shlex.join(bastion_bin())])
        assert result.exit_code == 0, result.output
        out[name] = path
    return out


class Kubectl:
    """Runs kubectl with a per-test HOME/KUBECACHEDIR and a token for the credential plugin."""

    def __init__(self, binary: str, home: Path, kubeconfig: Path, env: dict[str, str]) -> None:
        self.binary, self.home, self.kubeconfig, self.extra = binary, home, kubeconfig, env

    def env(self, **extra: str) -> dict[str, str]:
        return kube_env(self.home, {"KUBECONFIG": str(self.kubeconfig), **self.extra, **extra})

    def argv(self, args: list[str]) -> list[str]:
        return [self.binary, *args]

    def run(self, *args: str, input: bytes | None = None, timeout: float = 30,
            **env: str) -> subprocess.CompletedProcess[bytes]:
        result = subprocess.run(self.argv(list(args)), input=input, capture_output=True, timeout=timeout,
                                env=self.env(**env), stdin=None if input is not None else subprocess.DEVNULL)
        # kubectl logs a frame it does not expect (a server-side CLOSE, an unknown channel)
        # and goes on: the protocol error would otherwise pass unnoticed.
        assert b"websocket.go" not in result.stderr, result.stderr.decode(errors="replace")
        return result

    def popen(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(list(args)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, env=self.env(**env), start_new_session=True)


@pytest.fixture
def kube(kubectl: str, kubeconfigs: dict[str, Path], oidc: OIDCProvider, tmp_path: Path) -> Any:
    """``kube(cluster="prod", client="agent-sre", token=None)`` -> Kubectl."""

    def make(cluster: str = "prod", client: str | None = "agent-sre", token: str | None = None,
             **env: str) -> Kubectl:
        home = tmp_path / f"home-{cluster}-{client}-{len(list(tmp_path.iterdir()))}"
        home.mkdir()
        extra = dict(env)
        if token is None and client is not None:
            token = oidc.token(client)
        if token is not None:
            extra["GUARITA_TOKEN"] = token
        return Kubectl(kubectl, home, kubeconfigs[cluster], extra)

    return make


def _text(result: subprocess.CompletedProcess[bytes]) -> str:
    return (result.stdout + result.stderr).decode(errors="replace")


def _session(kgw: KubeGateway, since: int, **fields: Any) -> tuple[str, dict[str, Any], list[Any]]:
    return kgw.session_recording(since=since, front_door="kube", **fields)


def _raw_request(kgw: KubeGateway, method: str, path: str, headers: dict[str, str] | None = None,
                 body: bytes | None = None) -> tuple[int, dict[str, Any]]:
    """A request with the path sent exactly as given (no client-side normalisation)."""
    context = ssl.create_default_context(cafile=str(kgw.ca_file))
    conn = http.client.HTTPSConnection("127.0.0.1", kgw.kube_port, context=context, timeout=30)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in (headers or {}).items():
            conn.putheader(key, value)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, {"raw": data.decode(errors="replace")}


def _exp(token: str) -> int:
    return int(jwt.decode(token, options={"verify_signature": False})["exp"])


# ---------------------------------------------------------------------------
# kubeconfig and credentials
# ---------------------------------------------------------------------------


def test_kubeconfig_has_server_ca_and_exec_plugin(kgw: KubeGateway, tmp_path: Path) -> None:
    kube_dir = tmp_path / ".kube"
    kube_dir.mkdir()
    existing = {"apiVersion": "v1", "kind": "Config", "current-context": "other",
                "clusters": [{"name": "other", "cluster": {"server": "https://other:6443"}}],
                "users": [{"name": "other", "user": {"token": "x"}}],
                "contexts": [{"name": "other", "context": {"cluster": "other", "user": "other"}}]}
    (kube_dir / "config").write_text(yaml.safe_dump(existing))
    result = subprocess.run([*bastion_bin(), "kubeconfig", "--cluster", "prod", "--gateway", kgw.http_url],
                            capture_output=True, text=True, timeout=60, env=kube_env(tmp_path))
    assert result.returncode == 0, result.stderr
    path = kube_dir / "config"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    doc = yaml.safe_load(path.read_text())
    assert doc["current-context"] == "guarita-prod"
    assert {c["name"] for c in doc["contexts"]} == {"other", "guarita-prod"}  # merged, nothing lost
    cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == "guarita-prod")
    assert cluster["server"] == f"https://127.0.0.1:{kgw.kube_port}/clusters/prod"
    assert base64.b64decode(cluster["certificate-authority-data"]) == kgw.ca_file.read_bytes()
    plugin = next(u["user"]["exec"] for u in doc["users"] if u["name"] == "guarita-prod")
    assert plugin["apiVersion"] == "client.authentication.k8s.io/v1"
    assert plugin["interactiveMode"] == "IfAvailable"
    assert plugin["command"] == "bastion" and plugin["args"] == ["token", "--exec-credential"]


def test_exec_credential_from_env_and_file(oidc: OIDCProvider, tmp_path: Path) -> None:
    token = oidc.token("agent-sre")
    result = subprocess.run([*BASTION, "token", "--exec-credential"], capture_output=True, text=True, timeout=30,
                            env=kube_env(tmp_path, {"GUARITA_TOKEN": token}))
    assert result.returncode == 0, result.stderr
    cred = json.loads(result.stdout)
    assert cred["apiVersion"] == "client.authentication.k8s.io/v1" and cred["kind"] == "ExecCredential"
    assert cred["status"]["token"] == token
    expected = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(_exp(token)))
    assert cred["status"]["expirationTimestamp"] == expected
    # A projected service-account token or a CI job's token file.
    (tmp_path / "sa-token").write_text(token + "\n")
    result = subprocess.run([*BASTION, "token", "--token-file", str(tmp_path / "sa-token")], capture_output=True,
                            text=True, timeout=30, env=kube_env(tmp_path))
    assert result.stdout.strip() == token
    # No source at all: a clear message, not a traceback.
    result = subprocess.run([*BASTION, "token", "--exec-credential"], capture_output=True, text=True, timeout=30,
                            env=kube_env(tmp_path))
    assert result.returncode == 1 and "GUARITA_CLIENT_ID" in result.stderr and "Traceback" not in result.stderr


def test_client_credentials_token_is_cached(kube: Any, oidc: OIDCProvider, standin: KubeAPIStandIn) -> None:
    k = kube(client=None, GUARITA_CLIENT_ID="agent-sre", GUARITA_CLIENT_SECRET="sre-secret",
             GUARITA_ISSUER=oidc.issuer)
    first = k.run("get", "pods")
    assert first.returncode == 0, _text(first)
    cache = k.home / ".cache" / "guarita" / "token.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    before = cache.read_text()
    entry = next(iter(json.loads(before)["tokens"].values()))
    assert jwt.decode(entry["token"], options={"verify_signature": False})["sub"] == "agent-sre"
    mark = standin.mark()
    second = k.run("get", "pods")
    assert second.returncode == 0, _text(second)
    assert cache.read_text() == before  # reused, not fetched again
    seen = [r for r in standin.requests(mark) if r.path.endswith("/pods")]
    assert seen and seen[-1].header("Impersonate-User") == ["agent-sre"]


# ---------------------------------------------------------------------------
# ordinary requests, watches, logs
# ---------------------------------------------------------------------------


def test_get_pods_with_gateway_credentials_and_impersonation(kube: Any, standin: KubeAPIStandIn,
                                                              kgw: KubeGateway) -> None:
    k = kube()
    mark = standin.mark()
    result = k.run("get", "pods")
    assert result.returncode == 0, _text(result)
    out = result.stdout.decode()
    assert "NAME" in out and "web" in out and "2/2" in out and "Running" in out
    seen = [r for r in standin.requests(mark) if r.path == "/api/v1/namespaces/default/pods"]
    assert seen, [r.path for r in standin.requests(mark)]
    for r in standin.requests(mark):
        assert r.header("Authorization") == [f"Bearer {GATEWAY_TOKEN}"]  # never the agent's JWT
        assert r.header("Impersonate-User") == ["agent-sre"]
        assert r.header("Impersonate-Group") == ["sre"]
    single = k.run("get", "pod", "web", "-o", "jsonpath={.spec.containers[*].name}")
    assert single.stdout.decode() == "app sidecar"
    kgw.wait_audit("kube.request", subject="agent-sre", cluster="prod", status=200)


def test_watch_streams_events(kube: Any) -> None:
    proc = kube().popen("get", "pods", "-w")
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        buf = b""
        deadline = time.monotonic() + 30
        # The list first, then MODIFIED events for "ticker" as the stand-in sends them.
        while sum(1 for line in lines if line.startswith("ticker")) < 3:
            assert time.monotonic() < deadline, lines
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, (lines, proc.stderr.read() if proc.stderr else b"")
            buf += chunk
            *done, buf = buf.split(b"\n")
            lines += [d.decode() for d in done]
    finally:
        proc.kill()
        proc.wait(10)
    restarts = [line.split()[3] for line in lines if line.startswith("ticker")]
    assert restarts[0] == "0" and len(set(restarts[1:])) == len(restarts[1:])  # new events, not a replay


def test_logs_follow_streams(kube: Any) -> None:
    proc = kube().popen("logs", "-f", "web", "-c", "sidecar")
    try:
        assert proc.stdout is not None
        got = b""
        deadline = time.monotonic() + 30
        while got.count(b"\n") < 5:
            assert time.monotonic() < deadline, got
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, got
            got += chunk
        assert got.startswith(b"log line 1 from web/sidecar\nlog line 2 from web/sidecar\n")
        assert proc.poll() is None  # still following
    finally:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------
# exec and attach
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("code", [0, 3, 42])
def test_exec_exit_codes(kube: Any, code: int) -> None:
    result = kube().run("exec", "web", "-c", "app", "--", "sh", "-c", f"exit {code}")
    assert result.returncode == code, _text(result)


def test_exec_non_tty_is_recorded_with_stdout_stderr_and_metadata(kube: Any, kgw: KubeGateway,
                                                                  standin: KubeAPIStandIn) -> None:
    since = kgw.audit_mark()
    script = "echo 'out: olá'; echo err-line >&2; printf 'a+b c\\n'; exit 7"
    result = kube().run("exec", "web", "-c", "sidecar", "--", "sh", "-c", script)
    assert result.returncode == 7, _text(result)
    assert result.stdout == "out: olá\na+b c\n".encode()
    assert b"err-line\n" in result.stderr
    assert standin.execs[-1]["argv"] == ["sh", "-c", script]  # exactly what was recorded ran
    command = shlex.join(["sh", "-c", script])
    sid = find_session(kgw.audit_events(since), command=command, front_door="kube")
    kgw.read_recording(sid)  # waits for the manifest, checks the hash chain
    store = open_store(kgw.recordings_dir.as_uri(), "COMPLIANCE", 86400)
    summary = open_session(store, sid)
    events = list(iter_events(store, summary))
    assert stream_bytes(events, "o") == result.stdout
    assert stream_bytes(events, "e") == b"err-line\n"
    meta = summary.meta
    assert (meta["front_door"], meta["target"], meta["cluster"], meta["namespace"], meta["pod"],
            meta["container"]) == ("kube", "prod", "prod", "default", "web", "sidecar")
    assert meta["command"] == command and meta["argv"] == ["sh", "-c", script]
    assert meta["tty"] is False and meta["kind"] == "exec"
    assert meta["identity"]["subject"] == "agent-sre"
    assert summary.exit_status == 7


def test_exec_stdin_that_ends(kube: Any, kgw: KubeGateway) -> None:
    since = kgw.audit_mark()
    result = kube().run("exec", "-i", "web", "--", "sh", "-c", "cat; echo done", input=b"hi\nthere\n")
    assert result.returncode == 0, _text(result)
    assert result.stdout == b"hi\nthere\ndone\n"
    _, manifest, events = _session(kgw, since, command="sh -c 'cat; echo done'")
    assert stream_bytes(events, "i") == b"hi\nthere\n"
    assert any(e.code == "m" and e.data.get("type") == "stdin-closed" for e in events)
    assert manifest["end"]["exit"]["status"] == 0


def test_exec_tty_with_resize(kube: Any, kgw: KubeGateway) -> None:
    since = kgw.audit_mark()
    k = kube()
    script = 'stty size; while IFS= read -r l; do [ "$l" = q ] && exit 4; stty size; done'
    with PtyCommand(k.argv(["exec", "-it", "web", "--", "sh", "-c", script]), k.env(), cols=90, rows=20) as term:
        term.expect(rb"20 90")
        term.resize(100, 30)
        deadline = time.monotonic() + 20
        while True:  # the resize travels on its own channel: poke until the shell sees it
            term.send(b"\r")
            try:
                term.expect(rb"30 100", timeout=0.5)
                break
            except TimeoutError:
                assert time.monotonic() < deadline, term.output()
        term.send(b"q\r")
        assert term.wait() == 4, term.output()
    _, manifest, events = _session(kgw, since, command=shlex.join(["sh", "-c", script]))
    assert manifest["session"]["tty"] is True
    assert manifest["session"]["term"]["cols"] == 90 and manifest["session"]["term"]["rows"] == 20
    assert "100x30" in [e.data for e in events if e.code == "r"]
    assert b"30 100" in stream_bytes(events, "o")
    assert manifest["end"]["exit"]["status"] == 4


def test_attach_with_piped_stdin(kube: Any, kgw: KubeGateway) -> None:
    since = kgw.audit_mark()
    result = kube().run("attach", "-i", "attach-pipe", "-c", "app", input=b"hello\n")
    assert result.returncode == 0, _text(result)
    assert b"echo:hello\n" in result.stdout
    _, manifest, events = _session(kgw, since, kind="attach")
    assert manifest["session"]["pod"] == "attach-pipe" and manifest["session"]["command"] is None
    assert b"echo:hello" in stream_bytes(events, "o")
    assert stream_bytes(events, "i") == b"hello\n"


def test_exec_against_a_v4_only_api_server(kube: Any, kgw: KubeGateway, standin: KubeAPIStandIn) -> None:
    since = kgw.audit_mark()
    result = kube(cluster="old").run("exec", "web", "--", "sh", "-c", "echo old-server; exit 5")
    assert result.returncode == 5, _text(result)
    assert result.stdout == b"old-server\n"
    assert standin.execs[-1]["protocol"] == "v4.channel.k8s.io"
    _, _, events = _session(kgw, since, command="sh -c 'echo old-server; exit 5'")
    assert {"type": "upstream", "protocol": "v4.channel.k8s.io"} in [e.data for e in events if e.code == "m"]


def test_exec_in_a_missing_container_reports_the_api_servers_message(kube: Any) -> None:
    result = kube().run("exec", "web", "-c", "nope", "--", "true")
    assert result.returncode != 0
    assert "container nope is not valid for pod web" in _text(result)


# ---------------------------------------------------------------------------
# what must never get through
# ---------------------------------------------------------------------------


def test_impersonation_headers_from_the_client_never_reach_the_cluster(kube: Any, kgw: KubeGateway,
                                                                        standin: KubeAPIStandIn) -> None:
    since, mark = kgw.audit_mark(), standin.mark()
    k = kube()
    result = k.run("--as", "system:admin", "--as-group", "system:masters", "get", "pods")
    assert result.returncode == 0, _text(result)
    execd = k.run("--as", "system:admin", "--as-group", "system:masters", "exec", "web", "--", "id", "-un")
    assert execd.returncode == 0, _text(execd)
    status, _ = _raw_request(kgw, "GET", "/clusters/prod/api/v1/namespaces/default/pods", {
        "Authorization": f"Bearer {k.extra['GUARITA_TOKEN']}", "Impersonate-User": "system:admin",
        "Impersonate-Group": "system:masters", "Impersonate-Uid": "0", "Impersonate-Extra-Scopes": "all",
        "X-Remote-User": "system:admin", "X-Remote-Group": "system:masters"})
    assert status == 200
    seen = standin.requests(mark)
    assert seen
    for r in seen:
        assert r.impersonation() == {"impersonate-user": ["agent-sre"], "impersonate-group": ["sre"]}, r
        assert not r.header("X-Remote-User") and not r.header("X-Remote-Group")
    assert all(e["headers"] for e in standin.execs)
    exec_headers = [(name.lower(), value) for name, value in standin.execs[-1]["headers"]]
    assert [h for h in exec_headers if h[0].startswith("impersonate-")] == [
        ("impersonate-user", "agent-sre"), ("impersonate-group", "sre")]
    stripped = [e for e in kgw.audit_events(since) if e.get("event") == "kube.impersonation_stripped"]
    assert stripped and "Impersonate-User" in stripped[0]["headers"]


def test_spdy_is_refused_with_the_kubectl_version_needed(kgw: KubeGateway, oidc: OIDCProvider, kube: Any) -> None:
    token = oidc.token("agent-sre")
    status, body = _raw_request(kgw, "POST", "/clusters/prod/api/v1/namespaces/default/pods/web/exec?command=id"
                                "&stdout=true", {"Authorization": f"Bearer {token}", "Connection": "Upgrade",
                                                 "Upgrade": "SPDY/3.1", "X-Stream-Protocol-Version":
                                                 "v4.channel.k8s.io"}, body=b"")
    assert status == 400 and body["kind"] == "Status" and body["reason"] == "BadRequest"
    assert "kubectl 1.30 or newer" in body["message"]
    old = old_kubectl()
    if old is not None:  # kubectl 1.29 speaks only SPDY: it prints our message
        k = kube()
        k.binary = old
        result = k.run("exec", "web", "--", "true")
        assert result.returncode != 0 and "kubectl 1.30 or newer" in _text(result), _text(result)


def test_port_forward_denied_without_policy(kube: Any, kgw: KubeGateway) -> None:
    since = kgw.audit_mark()
    result = kube().run("port-forward", "pod/web", f"{free_port()}:{free_port()}")
    assert result.returncode != 0
    assert "port-forward" in _text(result) and "not allowed" in _text(result), _text(result)
    kgw.wait_audit("kube.portforward.denied", since=since, subject="agent-sre", cluster="prod")


async def _tunnel(kgw: KubeGateway, token: str, while_open: Any) -> tuple[bytes, Any]:
    """A port-forward to an echo server through guarita (WebSocket v4, as kubectl 1.31+ does):
    one round trip, then ``while_open()`` (in a thread) while the tunnel stays open; returns
    what came back and how the gateway closed the WebSocket (None if it did not)."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    context = ssl.create_default_context(cafile=str(kgw.ca_file))
    url = f"{kgw.kube_url}/clusters/prod/api/v1/namespaces/default/pods/web/portforward?ports={port}"
    try:
        async with aiohttp.ClientSession() as http_session, http_session.ws_connect(
                url, protocols=("v4.channel.k8s.io",), ssl=context,
                headers={"Authorization": f"Bearer {token}"}) as ws:
            opened = [await ws.receive_bytes(timeout=10) for _ in range(2)]
            assert sorted(o[0] for o in opened) == [0, 1]
            await ws.send_bytes(b"\x00ping through the gateway")
            got = b""
            while len(got) < len(b"ping through the gateway"):
                msg = await ws.receive_bytes(timeout=10)
                assert msg[0] == 0
                got += msg[1:]
            if while_open is None:
                return got, None
            await asyncio.to_thread(while_open)
            closed = await ws.receive(timeout=20)
            return got, (closed.type, closed.data, closed.extra)
    finally:
        server.close()


def _operator(kgw: KubeGateway, oidc: OIDCProvider, method: str, path: str,
              body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
    """A call to guarita's operator API as agent-sre (an operator in this gateway)."""
    request = urllib.request.Request(f"{kgw.http_url}{path}", method=method,
                                     data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Authorization": f"Bearer {oidc.token('agent-sre')}",
                                              "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_port_forward_ends_on_a_lock_and_on_credential_expiry(kgw: KubeGateway, oidc: OIDCProvider) -> None:
    """A live tunnel is held to its caller like a session: a lock on the subject closes it
    (with the reason as the WebSocket close reason), and so does the token's expiry."""
    since = kgw.audit_mark()
    lock_ids: list[str] = []

    def lock() -> None:
        status, body = _operator(kgw, oidc, "POST", "/v1/locks",
                                 {"kind": "subject", "value": "agent-ci", "reason": "tunnel drill"})
        assert status == 201, body
        lock_ids.append(body["lock"]["id"])

    try:
        got, closed = asyncio.run(_tunnel(kgw, oidc.token("agent-ci"), lock))
    finally:
        for lock_id in lock_ids:
            assert _operator(kgw, oidc, "DELETE", f"/v1/locks/{lock_id}")[0] == 200
    assert got == b"ping through the gateway"
    assert closed is not None and closed[0] == aiohttp.WSMsgType.CLOSE and closed[1] == 1008, closed
    assert "tunnel drill" in closed[2], closed
    stopped = kgw.wait_audit("kube.portforward.stopped", since=since, subject="agent-ci")
    assert stopped["kind"] == "lock" and stopped["lock"] == lock_ids[0]
    end = kgw.wait_audit("kube.portforward.end", since=since, subject="agent-ci")
    assert "tunnel drill" in end["reason"] and end["stream"] == stopped["stream"]

    token = oidc.token("agent-brief-ci")  # lives 5 s
    got, closed = asyncio.run(_tunnel(kgw, token, lambda: None))
    assert got == b"ping through the gateway" and time.time() >= _exp(token) - 1
    assert closed is not None and closed[1] == 1008 and "credential expired" in closed[2], closed
    stopped = kgw.wait_audit("kube.portforward.stopped", since=since, subject="agent-brief-ci")
    assert stopped["kind"] == "expired"


def test_port_forward_allowed_is_relayed_and_audited(kgw: KubeGateway, oidc: OIDCProvider) -> None:
    since = kgw.audit_mark()
    got, _ = asyncio.run(_tunnel(kgw, oidc.token("agent-ci"), None))
    assert got == b"ping through the gateway"
    start = kgw.wait_audit("kube.portforward.start", since=since, subject="agent-ci")
    end = kgw.wait_audit("kube.portforward.end", since=since, subject="agent-ci")
    assert start["ports"] and end["bytes_in"] > 0 and end["bytes_out"] > 0


def _round_trip(port: int, data: bytes) -> bytes:
    """Sends ``data`` to 127.0.0.1:port (then EOF) while reading what comes back, to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        def send() -> None:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        got = bytearray()
        while chunk := conn.recv(65536):
            got += chunk
        sender.join(30)
        return bytes(got)


def _forwarding_port(proc: subprocess.Popen[bytes]) -> int:
    """The local port kubectl listens on, from its "Forwarding from 127.0.0.1:N -> M"."""
    line = _first_line(proc).decode()
    assert line.startswith("Forwarding from 127.0.0.1:"), line
    return int(line.split("->")[0].rsplit(":", 1)[1])


def _stop(proc: subprocess.Popen[bytes]) -> bytes:
    """Ends a kubectl still running (SIGTERM, as Ctrl-C would); returns its stderr."""
    if proc.poll() is None:
        proc.terminate()
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate(timeout=15)
    return err


def test_kubectl_port_forward_through_guarita(kube: Any, kgw: KubeGateway) -> None:
    """Real kubectl (SPDY/3.1 tunnelled in a WebSocket) through the front door to the demo
    cluster, to a real TCP server: bytes both ways, more than 64 KiB, two connections one
    after the other on one tunnel; audited with byte counts, never recorded."""
    since = kgw.audit_mark()
    big = os.urandom(300_000)
    with echo_server() as port:
        proc = kube(client="agent-ci").popen("port-forward", "pod/web", f":{port}")
        try:
            local = _forwarding_port(proc)
            assert _round_trip(local, b"ping through guarita") == b"ping through guarita"
            assert _round_trip(local, big) == big
            start = kgw.wait_audit("kube.portforward.start", since=since, subject="agent-ci")
            assert proc.poll() is None
        finally:
            err = _stop(proc)
    assert b"error" not in err.lower(), err.decode(errors="replace")
    # kubectl names the port in each stream it opens, not in the URL: the door reads it there.
    assert start["protocol"] == "SPDY/3.1+portforward.k8s.io" and start["ports"] == []
    assert start["pod"] == "web" and start["namespace"] == "default"
    end = kgw.wait_audit("kube.portforward.end", since=since, subject="agent-ci")
    assert end["stream"] == start["stream"] and end["ports"] == [str(port)] and end["connections"] == 2, end
    assert end["bytes_in"] > len(big) and end["bytes_out"] > len(big), end
    seen = [e for e in kgw.audit_events(since) if e.get("event") == "kube.portforward.port"]
    assert [(e["port"], e["stream"]) for e in seen] == [(str(port), start["stream"])], seen
    assert not [e for e in kgw.audit_events(since) if e.get("event") == "session.start"
                and e.get("subject") == "agent-ci"]


def test_kubectl_port_forward_to_a_closed_port_says_why(kube: Any, kgw: KubeGateway) -> None:
    """Nothing listens on the pod's port: the demo cluster writes the kubelet's message on
    the error stream, kubectl prints it and ends."""
    closed = free_port()
    proc = kube(client="agent-ci").popen("port-forward", "pod/web", f":{closed}")
    try:
        local = _forwarding_port(proc)
        assert _round_trip(local, b"anyone there?") == b""
        proc.wait(30)
    finally:
        err = _stop(proc).decode(errors="replace")
    assert proc.returncode != 0
    assert f"error forwarding port {closed} to pod default/web" in err and "connection refused" in err, err


def test_a_lock_ends_a_real_kubectl_port_forward(kube: Any, kgw: KubeGateway, oidc: OIDCProvider) -> None:
    """The tunnel is held to its caller: a lock closes it; kubectl reports the lost
    connection, the audit log says why."""
    since = kgw.audit_mark()
    lock_ids: list[str] = []
    with echo_server() as port:
        proc = kube(client="agent-ci").popen("port-forward", "pod/web", f":{port}")
        try:
            assert _round_trip(_forwarding_port(proc), b"before the lock") == b"before the lock"
            status, body = _operator(kgw, oidc, "POST", "/v1/locks",
                                     {"kind": "subject", "value": "agent-ci", "reason": "kubectl tunnel drill"})
            assert status == 201, body
            lock_ids.append(body["lock"]["id"])
            proc.wait(30)
        finally:
            err = _stop(proc).decode(errors="replace")
            for lock_id in lock_ids:
                assert _operator(kgw, oidc, "DELETE", f"/v1/locks/{lock_id}")[0] == 200
    assert proc.returncode != 0 and "lost connection to pod" in err, err
    stopped = kgw.wait_audit("kube.portforward.stopped", since=since, subject="agent-ci")
    assert stopped["kind"] == "lock" and stopped["lock"] == lock_ids[0]
    end = kgw.wait_audit("kube.portforward.end", since=since, subject="agent-ci")
    assert "kubectl tunnel drill" in end["reason"] and end["connections"] == 1


def test_port_forward_refusals_say_what_is_needed(kgw: KubeGateway, oidc: OIDCProvider) -> None:
    """An API server that accepts none of the offered subprotocols, and a plain SPDY
    upgrade (kubectl 1.30 and older, or kubectl's fallback): each one clear line."""
    path = "/clusters/prod/api/v1/namespaces/default/pods/web/portforward"
    auth = {"Authorization": f"Bearer {oidc.token('agent-ci')}"}
    status, body = _raw_request(kgw, "GET", path, {**auth, "Connection": "Upgrade", "Upgrade": "websocket",
                                                   "Sec-WebSocket-Version": "13",
                                                   "Sec-WebSocket-Key": base64.b64encode(os.urandom(16)).decode(),
                                                   "Sec-WebSocket-Protocol": "bogus.k8s.io"})
    assert status == 502 and "accepted none of the port-forward protocols offered (bogus.k8s.io)" in body["message"]
    status, body = _raw_request(kgw, "POST", path, {**auth, "Connection": "Upgrade", "Upgrade": "SPDY/3.1",
                                                    "X-Stream-Protocol-Version": "portforward.k8s.io"}, body=b"")
    assert status == 400 and "kubectl 1.31 or newer" in body["message"], body
    assert "SPDY/3.1+portforward.k8s.io" in body["message"]


def test_missing_expired_and_forged_tokens_get_401(kgw: KubeGateway, kube: Any, oidc: OIDCProvider,
                                                    oidc_short: OIDCProvider) -> None:
    status, body = _raw_request(kgw, "GET", "/clusters/prod/api/v1/namespaces/default/pods")
    assert status == 401 and body["kind"] == "Status" and body["reason"] == "Unauthorized"
    assert "bastion kubeconfig" in body["message"]
    header, payload, _ = oidc.token("agent-sre").split(".")
    forged = f"{header}.{payload}.{base64.urlsafe_b64encode(b'x' * 256).rstrip(b'=').decode()}"
    status, body = _raw_request(kgw, "GET", "/clusters/prod/api/v1/namespaces/default/pods",
                                {"Authorization": f"Bearer {forged}"})
    assert status == 401 and body["message"] == "guarita: the bearer token was not accepted"
    # kubectl's discovery client prints its own words for a 401, whatever the body says.
    result = kube(token=forged).run("get", "pods")
    assert result.returncode == 1 and "You must be logged in to the server" in _text(result)
    expired = oidc_short.token("agent-short")
    # Not synchronisation: the token must really be past exp + the issuer's 1 s leeway.
    time.sleep(max(0.0, _exp(expired) + 1.2 - time.time()))
    status, body = _raw_request(kgw, "GET", "/clusters/prod/api", {"Authorization": f"Bearer {expired}"})
    assert status == 401 and "expired" in str(body)
    result = kube(token=expired).run("get", "pods")
    assert result.returncode == 1 and "You must be logged in to the server" in _text(result)
    assert "token in GUARITA_TOKEN expired" in _text(result), _text(result)  # said by the credential plugin
    assert "Traceback" not in kgw.log_text()


def test_identity_not_allowed_gets_403(kube: Any, kgw: KubeGateway) -> None:
    result = kube(client="agent-nobody").run("get", "pods")
    assert result.returncode == 1
    assert "Error from server (Forbidden)" in _text(result) and "may not use cluster 'prod'" in _text(result)
    ci = kube(client="agent-ci")
    assert ci.run("get", "pods").returncode == 0
    other_ns = ci.run("get", "pods", "-n", "restricted")
    assert other_ns.returncode == 1 and "may not use namespace 'restricted'" in _text(other_ns)
    everywhere = ci.run("get", "pods", "-A")
    assert everywhere.returncode == 1 and "cluster-wide" in _text(everywhere)
    no_exec = kube(client="agent-nobody").run("exec", "web", "--", "true")
    assert no_exec.returncode == 1 and "Forbidden" in _text(no_exec), _text(no_exec)
    unknown = kube(cluster="nosuch").run("get", "pods")
    assert unknown.returncode == 1 and "NotFound" in _text(unknown)
    status, body = _raw_request(kgw, "GET", "/clusters/nosuch/api/v1/namespaces/default/pods",
                                {"Authorization": f"Bearer {ci.extra['GUARITA_TOKEN']}"})
    assert status == 404 and body["message"] == "guarita: no cluster named 'nosuch' (clusters you may use: prod)"


@pytest.mark.parametrize("path", [
    "/api/v1/namespaces/default/pods",
    "/clusters/prod/../certs/api/v1/namespaces/default/pods",
    "/clusters/prod/api/v1/namespaces/%2e%2e/pods",
    "/clusters/prod/api/v1/namespaces/default%2Fpods",
    "/clusters/prod/api//v1/pods",
    "/clusters/",
])
def test_paths_outside_a_cluster_or_with_traversal_get_400(kgw: KubeGateway, oidc: OIDCProvider,
                                                           standin: KubeAPIStandIn, path: str) -> None:
    mark = standin.mark()
    status, body = _raw_request(kgw, "GET", path, {"Authorization": f"Bearer {oidc.token('agent-sre')}"})
    assert status == 400 and body["kind"] == "Status" and body["reason"] == "BadRequest", body
    assert standin.requests(mark) == []


def test_upstream_down_or_slow_gets_502_or_504(kube: Any, kgw: KubeGateway) -> None:
    down = kube(cluster="down").run("get", "pods")
    assert down.returncode == 1 and "cannot reach the API server of cluster 'down'" in _text(down), _text(down)
    auth = {"Authorization": f"Bearer {kube().extra['GUARITA_TOKEN']}"}
    status, body = _raw_request(kgw, "GET", "/clusters/down/api/v1/namespaces/default/pods", auth)
    assert status == 502 and body["kind"] == "Status" and "cannot reach" in body["message"]
    started = time.monotonic()
    status, body = _raw_request(kgw, "GET", "/clusters/slow/api/v1/namespaces/default/pods", auth)
    assert status == 504 and body["reason"] == "Timeout" and "did not answer within" in body["message"]
    assert time.monotonic() - started < 10
    assert "Traceback" not in kgw.log_text()


def test_client_certificate_credentials(kube: Any, standin: KubeAPIStandIn) -> None:
    mark = standin.mark()
    result = kube(cluster="certs").run("get", "pods")
    assert result.returncode == 0, _text(result)
    seen = standin.requests(mark)
    assert seen and all(r.client_cn == "guarita-gateway" and not r.header("Authorization") for r in seen)
    assert all(r.header("Impersonate-User") == ["agent-sre"] for r in seen)


def test_in_cluster_token_is_reread_when_rotated(kube: Any, kgw: KubeGateway, standin: KubeAPIStandIn) -> None:
    k = kube(cluster="incluster")
    mark = standin.mark()
    assert k.run("get", "pods").returncode == 0
    assert standin.requests(mark)[-1].header("Authorization") == [f"Bearer {GATEWAY_TOKEN}"]
    token_file = kgw.data_dir / "creds" / "serviceaccount" / "token"
    tmp = token_file.with_name("token.new")
    tmp.write_text(ROTATED_TOKEN)
    os.replace(tmp, token_file)  # the way the kubelet swaps a projected token
    try:
        status_token = f"Bearer {k.extra['GUARITA_TOKEN']}"

        def rotated() -> bool:
            m = standin.mark()
            _raw_request(kgw, "GET", "/clusters/incluster/version", {"Authorization": status_token})
            return standin.requests(m)[-1].header("Authorization") == [f"Bearer {ROTATED_TOKEN}"]

        wait_for(rotated, timeout=10, what="the rotated token in use")
    finally:
        token_file.write_text(GATEWAY_TOKEN)


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("\n".join([
        "[gateway]", 'kube_listen = "nope"', "",
        "[[oidc]]", 'issuer = "https://idp.example.com"', 'audience = "guarita"', "",
        "[[clusters]]", 'name = "a/b"', "",
        "[[clusters]]", 'name = "x"', f'kubeconfig = "{tmp_path}/missing"', "in_cluster = true", "",
    ]))
    result = check_config(config)
    assert result.returncode == 2
    for needle in ("gateway.kube_listen", "clusters[0].name", "clusters[0]: set kubeconfig",
                   "clusters[1].in_cluster"):
        assert needle in result.stderr, result.stderr


def test_recording_survives_concurrent_exec_sessions(kube: Any, kgw: KubeGateway) -> None:
    """Two execs at once: each has its own session and recording."""
    since = kgw.audit_mark()
    k = kube()
    results: dict[int, subprocess.CompletedProcess[bytes]] = {}

    def one(n: int) -> None:
        results[n] = k.run("exec", "web", "--", "sh", "-c", f"echo session-{n}")

    threads = [threading.Thread(target=one, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for n in range(2):
        assert results[n].stdout == f"session-{n}\n".encode()
        _, _, events = _session(kgw, since, command=f"sh -c 'echo session-{n}'")
        assert stream_bytes(events, "o") == f"session-{n}\n".encode()


# ---------------------------------------------------------------------------
# approvals (bastion/approvals) on kubectl exec
# ---------------------------------------------------------------------------


def test_exec_denied_by_an_approval_rule_never_reaches_the_cluster(kube: Any, kgw: KubeGateway,
                                                                   standin: KubeAPIStandIn) -> None:
    since, runs = kgw.audit_mark(), len(standin.execs)
    result = kube().run("exec", "web", "--", "shutdown", "-h", "now")
    assert result.returncode != 0
    assert "nobody shuts pods down through guarita" in _text(result), _text(result)
    assert len(standin.execs) == runs  # the upstream exec was never opened
    _, manifest, _ = _session(kgw, since, command="shutdown -h now")
    assert "nobody shuts pods down" in (manifest["end"].get("reason") or "")


def test_exec_waits_for_approval_then_runs(kube: Any, kgw: KubeGateway, oidc: OIDCProvider) -> None:
    since = kgw.audit_mark()
    command = "echo kube-needs-approval; exit 6"
    proc = kube(client="agent-ci").popen("exec", "web", "--", "sh", "-c", command)
    try:
        rid = str(kgw.wait_audit("approval.requested", since, timeout=20)["request"])
        request = urllib.request.Request(
            f"{kgw.http_url}/v1/approvals/{rid}/approve", data=json.dumps({"reason": "fine"}).encode(),
            method="POST", headers={"Authorization": f"Bearer {oidc.token('agent-sre')}",
                                    "Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as resp:
            assert resp.status == 200
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 6, (out, err)
    assert out.endswith(b"kube-needs-approval\n") and rid.encode() in out + err  # the wait was announced


def test_exec_output_is_masked_on_a_masked_cluster(kube: Any, kgw: KubeGateway) -> None:
    """Masking through real kubectl: the client and the recording never hold the CPF or the
    e-mail; the masking markers hold the keyed hashes an auditor can recompute."""
    from bastion.masking import default_detectors, mask_bytes
    from bastion.masking.config import load_or_create_secret
    from bastion.masking.detectors import hmac_value
    from bastion.masking.stream import marker_values

    since = kgw.audit_mark()
    cpf, mail = "529.982.247-25", "maria.silva@example.com.br"
    script = f"echo 'cliente {cpf} {mail}'; echo '{cpf}' >&2"
    result = kube(cluster="masked").run("exec", "web", "-c", "app", "--", "sh", "-c", script)
    assert result.returncode == 0, _text(result)
    assert result.stdout.startswith(b"cliente ***.***.***-** ") and mail.encode() not in result.stdout
    assert cpf.encode() not in result.stderr and b"***.***.***-**" in result.stderr
    # The command line is kept masked too (audit log, metadata): issue 22.
    shown = mask_bytes(default_detectors(), b"any", shlex.join(["sh", "-c", script]).encode())[0].decode()
    sid = find_session(kgw.audit_events(since), command=shown, front_door="kube")
    manifest, events = kgw.read_recording(sid)
    assert cpf not in json.dumps(manifest) and mail not in json.dumps(manifest)
    recorded = b"".join(e.stream_bytes() or b"" for e in events if e.stream in ("o", "e"))
    assert cpf.encode() not in recorded and mail.encode() not in recorded
    secret = load_or_create_secret(kgw.data_dir / "masking.key")
    marks = [v for e in events if e.code == "m" and e.data.get("type") == "masking" and e.data["stream"] in "oe"
             for v in marker_values(e.data)]
    assert sorted((m["detector"], m["hmac"]) for m in marks) == sorted([
        ("cpf", hmac_value(secret, "cpf", cpf)), ("cpf", hmac_value(secret, "cpf", cpf)),
        ("email", hmac_value(secret, "email", mail))])
    assert manifest["end"]["masking"] == {"cpf": 4, "email": 2}  # the output's and the command line's


def test_exec_ends_when_the_credential_expires(kube: Any, kgw: KubeGateway, oidc: OIDCProvider) -> None:
    """A kube session is held to its caller's token like an SSH one (on_expiry = end)."""
    token = oidc.token("agent-brief-sre")  # lives 5 s
    exp = _exp(token)
    since = kgw.audit_mark()
    result = kube(token=token).run("exec", "web", "-c", "app", "--", "sleep", "60", timeout=60)
    ended = time.time()
    assert result.returncode != 0, _text(result)
    assert "your credential expired at" in _text(result) and "bastion login" in _text(result), _text(result)
    assert ended < exp + 10
    _, manifest, events = _session(kgw, since, command="sleep 60")
    assert [e for e in events if e.code == "m" and e.data.get("type") == "expired"]
    assert "credential expired" in manifest["end"]["reason"]


def test_pod_logs_are_masked_on_a_masked_cluster(kube: Any, kgw: KubeGateway, standin: KubeAPIStandIn) -> None:
    """`kubectl logs` is no way around masking: on a masked cluster the log stream is masked
    as exec output is, and the audit log holds the keyed hashes; elsewhere it passes as is."""
    from bastion.masking.config import load_or_create_secret
    from bastion.masking.detectors import hmac_value

    cpf, mail = "529.982.247-25", "maria.silva@example.com.br"
    standin.log_chunks["web/app"] = [f"pedido 1 cliente {cpf} ok\n".encode(), f"contato {mail}\n".encode(),
                                     b"fim 12345"]
    since = kgw.audit_mark()
    try:
        masked = kube(cluster="masked").run("logs", "web", "-c", "app")
        plain = kube().run("logs", "web", "-c", "app")
    finally:
        del standin.log_chunks["web/app"]
    assert masked.returncode == 0, _text(masked)
    assert masked.stdout == b"pedido 1 cliente ***.***.***-** ok\ncontato *****.*****@*******.***.**\nfim 12345"
    assert cpf.encode() in plain.stdout and mail.encode() in plain.stdout  # prod: masking "none"
    event = kgw.wait_audit("kube.logs.masked", since=since, cluster="masked", pod="web")
    secret = load_or_create_secret(kgw.data_dir / "masking.key")
    assert sorted((v[0], v[3]) for v in event["values"]) == sorted([
        ("cpf", hmac_value(secret, "cpf", cpf)), ("email", hmac_value(secret, "email", mail))])
    assert event["masking"] == {"cpf": 1, "email": 1} and event["subject"] == "agent-sre"
    assert cpf not in json.dumps(event) and mail not in json.dumps(event)


def test_kubectl_cp_from_a_masked_cluster_copies_masked_contents(kube: Any, tmp_path: Path) -> None:
    """`kubectl cp` is a tar stream over exec: on a masked cluster the files' contents come
    out masked and the archive stays valid (redact keeps lengths). The documented limit: a
    value within 32 bytes after binary data (here the tar header's padding) is left alone."""
    cpf, other = "529.982.247-25", "111.444.777-35"
    header = f"id;cpf\n1;{other}\n"  # right after the tar header: binary data before it
    body = "".join(f"{n};cliente {n} cpf {cpf}\n" for n in range(2, 200))
    remote = tmp_path / "remote"
    remote.mkdir()
    (remote / "clientes.csv").write_text(header + body)
    local = tmp_path / "local.csv"
    result = kube(cluster="masked").run("cp", f"web:{remote / 'clientes.csv'}", str(local), "-c", "app")
    assert result.returncode == 0, _text(result)
    assert local.read_text() == header + body.replace(cpf, "***.***.***-**")


def test_masked_output_held_back_at_the_end_reaches_kubectl(kube: Any, kgw: KubeGateway) -> None:
    """Output that ends in what could be the start of a value (digits, no newline) is held
    back by the masker; it still reaches kubectl, before the stream's close (v5)."""
    script = "printf 'pedido 12345'; printf 'erro 678' >&2"
    result = kube(cluster="masked").run("exec", "web", "-c", "app", "--", "sh", "-c", script)
    assert result.returncode == 0, _text(result)
    assert (result.stdout, result.stderr) == (b"pedido 12345", b"erro 678")


# ---------------------------------------------------------------------------
# locks (bastion/control) on the Kubernetes front door
# ---------------------------------------------------------------------------


def test_lock_refuses_requests_and_ends_a_live_exec(kube: Any, kgw: KubeGateway, oidc: OIDCProvider) -> None:
    """A lock on a subject: its live ``kubectl exec`` ends with the reason, and every request it
    makes gets a 403 Status until the lock is lifted."""

    def call(method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, dict[str, Any]]:
        return _operator(kgw, oidc, method, path, body)

    ci = kube(client="agent-ci")
    since = kgw.audit_mark()
    proc = ci.popen("exec", "web", "--", "sh", "-c", "echo started; sleep 60")
    lock_id = None
    try:
        kgw.wait_audit("session.start", since, timeout=20, front_door="kube", subject="agent-ci")
        status, body = call("POST", "/v1/locks", {"kind": "subject", "value": "agent-ci", "reason": "kube drill"})
        assert status == 201, body
        lock_id = body["lock"]["id"]
        out, err = proc.communicate(timeout=15)
        assert proc.returncode != 0
        assert b"access for subject agent-ci was locked by an operator: kube drill" in err, (out, err)
        denied = ci.run("get", "pods")
        assert denied.returncode == 1
        assert "Error from server (Forbidden)" in _text(denied), _text(denied)
        assert f"access for subject agent-ci is locked by an operator: kube drill (lock {lock_id})" in _text(denied)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        if lock_id is not None:
            assert call("DELETE", f"/v1/locks/{lock_id}")[0] == 200
    assert ci.run("get", "pods").returncode == 0
    _, manifest, events = _session(kgw, since, subject="agent-ci")
    assert [e.data["type"] for e in events if e.code == "m" and e.data.get("type") in ("lock", "terminated")] == [
        "lock", "terminated"]
    assert "kube drill" in manifest["end"]["reason"]


def _first_line(proc: subprocess.Popen[bytes], timeout: float = 20) -> bytes:
    """The first line a streaming kubectl prints (its stream is open then)."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    line = b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            assert left > 0 and sel.select(left), f"no output from {proc.args}"
            byte = os.read(proc.stdout.fileno(), 1)
            assert byte, f"{proc.args} ended: {proc.stderr.read() if proc.stderr else b''!r}"
            line += byte
    return line


def test_lock_ends_watches_and_followed_logs(kube: Any, kgw: KubeGateway, oidc: OIDCProvider) -> None:
    """`kubectl get -w` and `kubectl logs -f` are not sessions, but a lock ends them too: the
    watch with an ERROR event kubectl prints, the log with a last line."""
    ci = kube(client="agent-ci")
    since = kgw.audit_mark()
    logs = ci.popen("logs", "-f", "web", "-c", "sidecar")
    watch = ci.popen("get", "pods", "-w")
    lock_ids: list[str] = []
    try:
        assert b"log line" in _first_line(logs)
        _first_line(watch)
        status, body = _operator(kgw, oidc, "POST", "/v1/locks",
                                 {"kind": "subject", "value": "agent-ci", "reason": "stream drill"})
        assert status == 201, body
        lock_ids.append(body["lock"]["id"])
        logs_out, logs_err = logs.communicate(timeout=20)
        watch_out, watch_err = watch.communicate(timeout=20)
    finally:
        for proc in (logs, watch):
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for lock_id in lock_ids:
            assert _operator(kgw, oidc, "DELETE", f"/v1/locks/{lock_id}")[0] == 200
    ended = "guarita: this session was ended: access for subject agent-ci was locked by an operator: stream drill"
    assert ended.encode() in logs_out, (logs_out[-500:], logs_err)
    assert ended.encode() in watch_out, (watch_out[-800:], watch_err)  # kubectl prints the Status as a row
    stopped = kgw.audit_events(since)
    assert sorted(e.get("subresource") or e.get("resource") for e in stopped
                  if e["event"] == "kube.stream.stopped" and e["subject"] == "agent-ci") == ["log", "pods"]


def test_output_frames_merge_per_channel_in_order() -> None:
    """Output that piles up while the client is busy goes as one frame per run of a channel."""
    from bastion.doors.kube.exec import Codec

    chunks = [(1, b"ab"), (1, b"cd"), (2, b"err"), (1, b"ef"), (3, b"{}")]
    frames = Codec("v5.channel.k8s.io").frames(chunks)
    assert [b"".join(f) for f in frames] == [b"\x01abcd", b"\x02err", b"\x01ef", b"\x03{}"]
    assert Codec("v4.base64.channel.k8s.io").frames(chunks[:2]) == ["1YWJjZA=="]
    assert [b"".join(f) for f in Codec("v4.channel.k8s.io").frames([(1, b"x")])] == [b"\x01x"]


def test_malformed_requests_get_a_status_and_are_audited(kgw: KubeGateway) -> None:
    """An oversized header, a NUL in a header, `GET *`, a path with invalid bytes: a Kubernetes
    Status, an audit event, no traceback (the HTTP API's side: tests/test_http_malformed.py)."""
    from tests.test_http_malformed import MALFORMED, raw_exchange

    context = ssl.create_default_context(cafile=str(kgw.ca_file))
    mark = kgw.audit_mark()
    for name, (request, expected) in MALFORMED.items():
        status, ctype, body = raw_exchange(kgw.kube_port, request, context)
        assert status == expected, (name, status, body[:200])
        answer = json.loads(body)
        assert (answer["kind"], answer["code"], answer["reason"]) == ("Status", expected, "BadRequest"), answer
        assert answer["message"].startswith("guarita: ") and ctype.startswith("application/json"), answer
    events = [e for e in kgw.audit_events(mark) if e["event"] == "http.bad_request"]
    assert len(events) == len(MALFORMED) and all(e["front_door"] == "kube" for e in events), events
    assert "Traceback" not in kgw.log_text()
