"""``bastion serve --dev`` shows every capability: its banner's tour, run by ``bastion demo``
line by line as printed, with real ssh and real kubectl against the demo target and the
demo cluster (bastion/devmode.py, bastion/devtour.py); and what --dev refuses."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from bastion import devtour
from bastion.cli import main
from bastion.config import ConfigError
from bastion.devmode import DEMO_HOLD_PATTERN, dev_config
from tests.conftest import BASTION, free_port, wait_for
from tests.support.kube import find_kubectl

SCRIPTS = {"bastion": "bastion.cli", "replay": "replay.cli"}


def _bin_dir(path: Path) -> Path:
    """The commands the tour's lines name, from this checkout and this Python."""
    path.mkdir()
    for name, module in SCRIPTS.items():
        (path / name).write_text(f'#!/bin/sh\nexec {sys.executable} -m {module} "$@"\n')
    (path / "bastion-askpass").write_text(
        f'#!/bin/sh\nexec {sys.executable} -c "from bastion.cli import askpass_main; askpass_main()" "$@"\n')
    for script in path.iterdir():
        script.chmod(0o755)
    (path / "kubectl").symlink_to(find_kubectl())
    return path


def _env(tmp: Path) -> dict[str, str]:
    home = tmp / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GUARITA_", "KUBE", "SSH_A", "XDG_CACHE"))}
    env.update(HOME=str(home), KUBECACHEDIR=str(home / ".kube" / "cache"), NO_PROXY="127.0.0.1,localhost",
               PATH=f"{_bin_dir(tmp / 'bin')}:{env.get('PATH', '/usr/bin:/bin')}",
               PYTHONPATH=os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                      env.get("PYTHONPATH")) if p))
    return env


@pytest.fixture()
def dev_gateway(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path, dict[str, str]]]:
    """`bastion serve --dev` on free loopback ports, with its banner in a file."""
    with _dev_serve(tmp_path) as running:
        yield running


@contextlib.contextmanager
def _dev_serve(tmp_path: Path, *flags: str) -> Iterator[tuple[subprocess.Popen[bytes], Path, Path, dict[str, str]]]:
    data, log = tmp_path / "data", tmp_path / "serve.log"
    env = _env(tmp_path)
    with open(log, "wb") as out:
        proc = subprocess.Popen([*BASTION, "serve", "--dev", "--data-dir", str(data), "--log-format", "text",
                                 "--ssh-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{free_port()}",
                                 "--kube-listen", f"127.0.0.1:{free_port()}", *flags],
                                cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or "LOCK_ID: printed" in log.read_text(), 60, "the --dev banner")
        assert proc.poll() is None, log.read_text()
        yield proc, data, log, env
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_the_banner_tour_runs_as_printed_with_real_ssh_and_kubectl(dev_gateway, tmp_path: Path) -> None:
    proc, data, log, env = dev_gateway
    banner = devtour.parse_banner(log.read_text())
    assert len(banner) >= 20, log.read_text()
    for needed in ("ssh -p", " -t demo@", "kubectl exec web", "kubectl exec -it", "bastion approvals approve",
                   devtour.CPF, "replay cat", "replay verify", "replay evidence", "bastion lock", "bastion kubeconfig",
                   "kubectl port-forward pod/web"):
        assert any(needed in line for line in banner), f"no tour line with {needed!r}"

    done = subprocess.run([*BASTION, "demo", "--data-dir", str(data)], cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=180)
    report = done.stdout + done.stderr
    # Every line the banner printed, and only those, ran in its order.
    assert [m[4:] for m in re.findall(r"^  \$ .*$", done.stdout, re.MULTILINE)] == banner, report
    assert f"{len(banner)} of {len(banner)} steps worked" in done.stdout, report
    assert done.returncode == 0, report
    assert "FAILED" not in done.stdout, report
    # What the steps showed, as a user reads it: masked live, held then approved, refused while locked.
    shown = "\n".join(line for line in done.stdout.splitlines() if line.startswith("    "))  # outputs, not lines
    assert devtour.CPF not in shown and "customer ***.***.***-**" in shown, report
    assert re.search(r"request \S+ approved by approver", done.stdout), report
    assert "locked by an operator" in done.stdout, report
    assert re.search(r'Forwarding from 127\.0\.0\.1:\d+[\s\S]*"status": "ok"', done.stdout), report  # a real tunnel
    # The recordings have the CPF masked too.
    listed = subprocess.run([sys.executable, "-m", "replay.cli", "ls", "--command", "customer", "--json",
                             "--data-dir", str(data)], env=env, capture_output=True, text=True, timeout=60)
    sessions = [json.loads(line)["id"] for line in listed.stdout.splitlines() if line.strip()]
    assert sessions, listed.stderr
    for sid in sessions:
        shown = subprocess.run([sys.executable, "-m", "replay.cli", "cat", sid, "--data-dir", str(data)], env=env,
                               capture_output=True, text=True, timeout=60)
        assert "customer" in shown.stdout and devtour.CPF not in shown.stdout, shown.stdout
    assert proc.poll() is None


def test_sighup_reloads_the_overlay_of_dev(tmp_path: Path) -> None:
    """`--dev --config FILE`: SIGHUP reads the file again over the embedded default; a file
    with a mistake changes nothing and says why."""
    overlay = tmp_path / "more.toml"
    overlay.write_text("")
    with _dev_serve(tmp_path, "--config", str(overlay)) as (proc, _, log, _):
        overlay.write_text('[[approvals]]\nname = "overlay rule"\npattern = "needs-overlay"\napprovers = ["sre"]\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "SIGHUP: reloaded" in log.read_text(), 30, "the reload")
        reloaded = next(line for line in log.read_text().splitlines() if "SIGHUP: reloaded" in line)
        assert str(overlay) in reloaded and "approvals" in reloaded, reloaded
        overlay.write_text('[[approvals]]\nname = "broken"\npattern = "("\napprovers = ["sre"]\n')
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: "the running configuration stays" in log.read_text(), 30, "the refused reload")
        assert "approvals" in log.read_text().split("SIGHUP: reloaded")[-1], log.read_text()
        assert "Traceback" not in log.read_text() and proc.poll() is None


# -- what --dev refuses, one clear line each ----------------------------------------------


def _serve(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BASTION, "serve", "--dev", "--data-dir", str(tmp_path / "d"), *flags],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)


def test_a_port_in_use_is_named_with_the_flag_that_moves_it(tmp_path: Path) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        done = _serve(tmp_path, "--ssh-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{port}",
                      "--kube-listen", f"127.0.0.1:{free_port()}")
    assert done.returncode == 1, done.stderr
    assert f"port {port}" in done.stderr and "--http-listen" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_dev_outside_loopback_is_refused(tmp_path: Path) -> None:
    done = _serve(tmp_path, "--kube-listen", "0.0.0.0:0")
    assert done.returncode == 2 and "--kube-listen" in done.stderr and "not loopback" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_an_overlay_cannot_move_dev_off_loopback(tmp_path: Path) -> None:
    overlay = tmp_path / "more.toml"
    overlay.write_text('[gateway]\nssh_listen = "0.0.0.0:2222"\n')
    with pytest.raises(ConfigError) as exc:
        dev_config(tmp_path / "d", overlay_file=overlay)
    assert exc.value.problems[0][0] == "gateway.ssh_listen"


def test_dev_config_overlays_a_file_on_the_embedded_default(tmp_path: Path) -> None:
    overlay = tmp_path / "more.toml"
    overlay.write_text("\n".join([
        "[[oidc]]", 'issuer = "https://idp.example.com"', 'audience = "guarita"',
        "[[targets]]", 'name = "web"', 'host = "10.0.0.5"', 'logins = ["deploy"]',
        'host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl"]', 'credential = "ca"',
        "[[access]]", 'name = "sre on web"', 'groups = ["sre"]', 'targets = ["web"]',
        "[[approvals]]", 'name = "shutdown"', 'pattern = "shutdown"', 'approvers = ["approvers"]',
        "[masking]", 'default_apply = "live"', ""]))
    config = dev_config(tmp_path / "d", overlay_file=overlay)
    assert config.dev and config.demo_target
    assert [i.issuer for i in config.issuers] == ["http://127.0.0.1:8080/dev", "https://idp.example.com"]
    assert [t.name for t in config.targets] == ["web"]
    assert {"sre on web", "dev: everyone may use the demo target"} <= {a.name for a in config.access}
    # The file's rules are checked first; the demo rule stays.
    assert [r.name for r in config.approvals.rules] == ["shutdown", "dev: rm -rf and DROP need an approver"]
    assert config.masking is not None and config.masking.default_apply == "live"


def test_an_overlay_with_a_mistake_names_the_key(tmp_path: Path) -> None:
    overlay = tmp_path / "more.toml"
    overlay.write_text('[[approvals]]\nname = "x"\npattern = "("\napprovers = ["a"]\n')
    with pytest.raises(ConfigError) as exc:
        dev_config(tmp_path / "d", overlay_file=overlay)
    assert any(key == "approvals[0].pattern" for key, _ in exc.value.problems), exc.value.problems
    overlay.write_text("[[approvals]\n")
    with pytest.raises(ConfigError) as exc:
        dev_config(tmp_path / "d", overlay_file=overlay)
    assert "not valid TOML" in exc.value.problems[0][1]


def test_dev_token_names_the_demo_identities() -> None:
    done = CliRunner().invoke(main, ["dev-token", "mallory"])
    assert done.exit_code == 2
    assert all(name in done.output for name in ("agent", "approver", "auditor", "operator")), done.output
    assert CliRunner().invoke(main, ["dev-token"]).exit_code == 2


def test_kubeconfig_needs_a_cluster_or_dev() -> None:
    done = CliRunner().invoke(main, ["kubeconfig"])
    assert done.exit_code == 2 and "--dev" in done.output


def test_demo_without_a_running_dev_gateway_says_how_to_start_one(tmp_path: Path) -> None:
    done = CliRunner().invoke(main, ["demo", "--data-dir", str(tmp_path)])
    assert done.exit_code == 1 and "bastion serve --dev" in done.output, done.output
    # A tour left by a gateway that has stopped since.
    devtour.Where(ssh_host="127.0.0.1", ssh_port=free_port(), http_url=f"http://127.0.0.1:{free_port()}",
                  data_dir=str(tmp_path), host_key="ssh-ed25519 AAAA").save(tmp_path)
    done = CliRunner().invoke(main, ["demo", "--data-dir", str(tmp_path)])
    assert done.exit_code == 1 and "no gateway answers" in done.output and "Traceback" not in done.output, done.output


@pytest.mark.parametrize("command", ["rm -rf /tmp/x", "rm -fr x", "rm -Rf x", "rm -r -f x", "rm -f -r x",
                                     "rm -v -rf x", "rm --recursive x", "sudo rm -rf /", "DROP TABLE users;",
                                     "psql -c 'drop database app'", "echo 1; Drop Schema s"])
def test_the_demo_rule_holds_rm_rf_and_drop(command: str) -> None:
    assert re.search(DEMO_HOLD_PATTERN, command)


@pytest.mark.parametrize("command", ["rm x", "rm -f x", "rm -r dir", "firm -rf", "echo dropped", "ls -rf"])
def test_the_demo_rule_leaves_other_commands(command: str) -> None:
    assert not re.search(DEMO_HOLD_PATTERN, command)


def test_the_banner_parses_back_to_the_tour_lines() -> None:
    where = devtour.Where(ssh_host="127.0.0.1", ssh_port=2222, http_url="http://127.0.0.1:8080",
                          data_dir="/srv/guarita data", console=True, forward_port=18080)
    text = "\n".join(["guarita is listening", *devtour.banner(where), "", "later log line"])
    assert devtour.parse_banner(text) == [s.line for s in devtour.steps(where)]
    assert "'/srv/guarita data'" in devtour.steps(where)[-5].line  # quoted for the shell
    assert "kubectl port-forward pod/web 18080:8080 & curl" in devtour.parse_banner(text)[-8], text

