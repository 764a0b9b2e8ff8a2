"""One admission path for both front doors, through real parts: OpenSSH ``ssh`` and real
``kubectl`` against one gateway (``bastion serve``) whose recording spool is a small tmpfs.

* strict is strict at session open: with the spool full, a new session is refused on
  both doors with one clear line before any byte of the session reaches the client, and
  both refusals are counted by ``guarita_sessions_refused_total``;
* the live-session list is true: after 20 short ``ssh ... true`` sessions, GET
  /v1/sessions lists none of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    bastion_bin,
    check_config,
    gateway_config,
    target_block,
    toml_str,
    wait_for,
)
from tests.support.kube import KubeGateway, find_kubectl
from tests.support.kubeapi import KubeAPIStandIn
from tests.support.oidc import OIDCProvider
from tests.support.openssh import run_ssh
from tests.test_kube_e2e import Kubectl
from tests.test_operations import http, scrape, value

pytestmark = pytest.mark.timeout(120)
TOKEN = "pipeline-gateway-token"
SPOOL_SIZE = 8 * 1024 * 1024


def _mount_tmpfs(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SPOOL_SIZE},mode=0700", "tmpfs", str(path)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the spool (needs root): {result.stderr.strip()}")


@pytest.fixture(scope="module")
def pgw(oidc: OIDCProvider, targets: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeGateway]:
    data_dir = tmp_path_factory.mktemp("pipelinegw")
    spool = data_dir / "spool"
    _mount_tmpfs(spool)
    standin = KubeAPIStandIn(tmp_path_factory.mktemp("pipelinestandin"), tokens=(TOKEN,))
    gw: KubeGateway | None = None
    try:
        standin.__enter__()
        kubeconfig = standin.kubeconfig(data_dir / "prod.yaml", token=TOKEN)
        t = targets
        text = gateway_config(
            data_dir, [(oidc.issuer, "5s")],  # type: ignore[list-item]
            target_block("web-ca", t.web_ca.port, [t.login], [t.web_ca.host_key_line], "ca")
            + f'\n[[clusters]]\nname = "prod"\nkubeconfig = {toml_str(str(kubeconfig))}\n',
            '[[access]]\nname = "sre"\ngroups = ["sre"]\ntargets = ["*"]\nclusters = ["*"]\n\n'
            '[roles]\noperators = { groups = ["sre"] }\nauditors = { groups = ["sre"] }\n')
        text = text.replace(toml_str(str(data_dir / "target_ca_key")), toml_str(str(t.target_ca_key)))
        text = text.replace("[recording]\n", f"[recording]\nspool_dir = {toml_str(str(spool))}\n", 1)
        config = data_dir / "guarita.toml"
        config.write_text(text)
        checked = check_config(config)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        gw = KubeGateway(config, data_dir)
        gw.start()
        yield gw
    finally:
        if gw is not None:
            gw.stop()
        standin.__exit__(None, None, None)
        subprocess.run(["umount", "-l", str(spool)], capture_output=True)


@pytest.fixture
def kubectl(pgw: KubeGateway, oidc: OIDCProvider, tmp_path: Path) -> Kubectl:
    from click.testing import CliRunner

    from bastion.cli import main

    path = tmp_path / "kubeconfig.yaml"
    result = CliRunner().invoke(main, ["kubeconfig", "--cluster", "prod", "--gateway", pgw.http_url,
                                       "--output", str(path), "--exec-command", shlex.join(bastion_bin())])
    assert result.exit_code == 0, result.output
    home = tmp_path / "home"
    home.mkdir()
    return Kubectl(find_kubectl(), home, path, {"GUARITA_TOKEN": oidc.token("agent-sre")})


def _ssh(gw: KubeGateway, login: str, command: str, token: str) -> subprocess.CompletedProcess[bytes]:
    return run_ssh(["-p", str(gw.ssh_port), f"{login}@web-ca@127.0.0.1", command], token=token)


@contextlib.contextmanager
def _spool_filled(spool: Path) -> Iterator[None]:
    """Fill the spool's filesystem to the last byte (ENOSPC for any new file's data)."""
    filler = spool / f"filler-{uuid.uuid4().hex}"
    try:
        with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):
            while True:  # unbuffered: nothing is left to write (and fail) when it closes
                out.write(b"\0" * 65536)
        yield
    finally:
        filler.unlink(missing_ok=True)


def test_a_full_spool_refuses_new_sessions_on_both_doors(pgw: KubeGateway, oidc: OIDCProvider, targets: Any,
                                                         kubectl: Kubectl) -> None:
    token = oidc.token("agent-sre")
    sre = token
    before = scrape(pgw, sre)
    mark = pgw.audit_mark()
    with _spool_filled(pgw.data_dir / "spool"):
        r = _ssh(pgw, targets.login, "echo never-ran", token)
        k = kubectl.run("exec", "web", "--", "sh", "-c", "echo never-ran")
    # SSH: exit 255, nothing on stdout, one line on stderr that says why.
    assert r.returncode == 255, r
    assert r.stdout == b""
    lines = [line for line in r.stderr.decode().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("guarita: the recording spool"), lines
    assert "No space left on device" in lines[0] and "unrecorded" in lines[0]
    # kubectl: a Status with the same reason; the command never ran.
    assert k.returncode != 0
    assert b"never-ran" not in k.stdout
    assert b"the recording spool" in k.stderr and b"unrecorded" in k.stderr, k.stderr
    # One refusal event for every door, counted by the metric.
    for door in ("ssh", "kube"):
        event = pgw.wait_audit("session.refused", mark, front_door=door)
        assert event["reason"] == "recording_unavailable", event
    after = scrape(pgw, sre)
    for door in ("ssh", "kube"):
        labels = {"front_door": door, "reason": "recording_unavailable"}
        assert value(after, "guarita_sessions_refused_total", **labels) == \
            value(before, "guarita_sessions_refused_total", **labels) + 1
    assert not [e for e in pgw.audit_events(mark) if e.get("event") == "session.start"]
    # Space is back: sessions open again, on both doors.
    again = _ssh(pgw, targets.login, "echo ran", token)
    assert again.stdout == b"ran\n", again
    assert kubectl.run("exec", "web", "--", "sh", "-c", "echo ran").stdout == b"ran\n"


def test_the_live_session_list_empties_after_short_sessions(pgw: KubeGateway, oidc: OIDCProvider,
                                                            targets: Any) -> None:
    token = oidc.token("agent-sre")
    mark = pgw.audit_mark()
    with concurrent.futures.ThreadPoolExecutor(10) as pool:  # as agents do: several at once
        results = list(pool.map(lambda _: _ssh(pgw, targets.login, "true", token), range(20)))
    assert [r.returncode for r in results] == [0] * 20, [r.stderr for r in results if r.returncode]
    ended = wait_for(lambda: len([e for e in pgw.audit_events(mark) if e.get("event") == "session.end"]) >= 20
                     or None, 30, "20 session.end events")
    assert ended

    def listed() -> list[dict[str, Any]]:
        status, body = http(pgw.http_url + "/v1/sessions", token)
        assert status == 200, body
        return list(json.loads(body)["sessions"])

    wait_for(lambda: listed() == [] or None, 15, "an empty live-session list")
    env = {**os.environ, "GUARITA_TOKEN": token}
    ls = subprocess.run([*bastion_bin(), "sessions", "ls", "--json", "--gateway", pgw.http_url],
                        capture_output=True, text=True, timeout=30, env=env)
    assert ls.returncode == 0 and json.loads(ls.stdout) == [], ls
    # A kill of an ended session answers "no such live session", never "is being ended".
    sid = next(e["session"] for e in pgw.audit_events(mark) if e.get("event") == "session.end")
    result = subprocess.run([*bastion_bin(), "sessions", "kill", sid, "--reason", "drill",
                             "--gateway", pgw.http_url], capture_output=True, text=True, timeout=30, env=env)
    assert result.returncode != 0 and "is being ended" not in result.stdout + result.stderr, result
