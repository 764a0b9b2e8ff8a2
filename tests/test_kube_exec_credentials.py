"""The gateway's own kubeconfig may use an ``exec`` credential plugin, as every managed
cluster's does (EKS, GKE, AKS): real ``kubectl`` -> guarita -> the API-server stand-in,
whose accepted token comes from a small plugin script printing an ExecCredential, then a
rotated one once the first expires. The plugin runs when the credential is due, not per
request."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bastion.upstreams.kube.credentials import KubeconfigError, load
from tests.conftest import bastion_bin, check_config, gateway_config, toml_str, wait_for
from tests.support.kube import KubeGateway, find_kubectl
from tests.support.kubeapi import KubeAPIStandIn
from tests.support.oidc import OIDCProvider
from tests.test_kube_e2e import Kubectl

pytestmark = pytest.mark.timeout(120)
FIRST, ROTATED = "exec-plugin-token-1", "exec-plugin-token-2"

PLUGIN = '''
import datetime, json, pathlib, sys
state = pathlib.Path(sys.argv[1])
runs = state / "runs"
runs.write_text(str(int(runs.read_text() or 0) + 1) if runs.exists() else "1")
if (state / "fail").exists():
    print("the identity provider is unreachable", file=sys.stderr)
    sys.exit(1)
ttl = int((state / "ttl").read_text())
expires = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(seconds=ttl)
print(json.dumps({"apiVersion": "client.authentication.k8s.io/v1", "kind": "ExecCredential",
                  "status": {"token": (state / "token").read_text().strip(),
                             "expirationTimestamp": expires.strftime("%Y-%m-%dT%H:%M:%SZ")}}))
'''


def _exec_kubeconfig(standin: KubeAPIStandIn, folder: Path) -> Path:
    """The stand-in's kubeconfig, its user an exec plugin (state: token, ttl, runs, fail)."""
    path = standin.kubeconfig(folder / "exec.yaml")
    (folder / "plugin.py").write_text(PLUGIN)
    doc = json.loads(path.read_text())
    doc["users"][0]["user"] = {"exec": {"apiVersion": "client.authentication.k8s.io/v1", "command": sys.executable,
                                        "args": [str(folder / "plugin.py"), str(folder)],
                                        "interactiveMode": "Never"}}
    path.write_text(json.dumps(doc))
    return path


@pytest.fixture(scope="module")
def standin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeAPIStandIn]:
    with KubeAPIStandIn(tmp_path_factory.mktemp("execstandin"), tokens=(FIRST, ROTATED)) as api:
        yield api


@pytest.fixture(scope="module")
def egw(oidc: OIDCProvider, standin: KubeAPIStandIn,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[KubeGateway, Path]]:
    data_dir = tmp_path_factory.mktemp("execgw")
    state = data_dir / "plugin"
    state.mkdir()
    (state / "token").write_text(FIRST)
    # Expires 32 s from now: due again (30 s before expiry) about 2 s after the first run.
    (state / "ttl").write_text("32")
    kubeconfig = _exec_kubeconfig(standin, state)
    text = gateway_config(data_dir, [(oidc.issuer, "5s")],  # type: ignore[list-item]
                          f'[[clusters]]\nname = "managed"\nkubeconfig = {toml_str(str(kubeconfig))}\n',
                          '[[access]]\nname = "sre"\ngroups = ["sre"]\nclusters = ["*"]\n')
    config = data_dir / "guarita.toml"
    config.write_text(text)
    checked = check_config(config)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    gw = KubeGateway(config, data_dir)
    try:
        gw.start()
        yield gw, state
    finally:
        gw.stop()


def test_an_exec_plugin_credential_is_used_and_rotated(egw: tuple[KubeGateway, Path], standin: KubeAPIStandIn,
                                                       oidc: OIDCProvider, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from bastion.cli import main

    gw, state = egw
    path = tmp_path / "kubeconfig.yaml"
    result = CliRunner().invoke(main, ["kubeconfig", "--cluster", "managed", "--gateway", gw.http_url,
                                       "--output", str(path), "--exec-command", shlex.join(bastion_bin())])
    assert result.exit_code == 0, result.output
    (tmp_path / "home").mkdir()
    kubectl = Kubectl(find_kubectl(), tmp_path / "home", path, {"GUARITA_TOKEN": oidc.token("agent-sre")})

    mark = standin.mark()
    got = kubectl.run("get", "pods")
    assert got.returncode == 0, got.stderr
    tokens = {tuple(r.header("Authorization")) for r in standin.requests(mark)}
    assert (f"Bearer {FIRST}",) in tokens and (f"Bearer {ROTATED}",) not in tokens

    (state / "token").write_text(ROTATED)  # what the plugin hands out once the first is due
    (state / "ttl").write_text("3600")

    def rotated() -> bool:
        m = standin.mark()
        assert kubectl.run("get", "pods").returncode == 0
        return standin.requests(m)[-1].header("Authorization") == [f"Bearer {ROTATED}"]

    wait_for(rotated, timeout=30, what="the plugin's rotated token in use")
    runs = int((state / "runs").read_text())
    for _ in range(3):
        assert kubectl.run("get", "pods").returncode == 0
    assert int((state / "runs").read_text()) == runs  # not run again while the token is valid


def test_a_failing_exec_plugin_is_named(standin: KubeAPIStandIn, tmp_path: Path) -> None:
    path = _exec_kubeconfig(standin, tmp_path)
    (tmp_path / "fail").write_text("")
    with pytest.raises(KubeconfigError) as err:
        asyncio.run(load(path, None))
    assert str(path) in str(err.value) and "plugin.py" in str(err.value)
    (tmp_path / "fail").unlink()
    (tmp_path / "token").write_text(FIRST)
    (tmp_path / "ttl").write_text("600")
    loaded = asyncio.run(load(path, None))
    assert loaded.token == FIRST and loaded.expires is not None

