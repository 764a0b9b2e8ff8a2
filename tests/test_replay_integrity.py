"""What S3 allows cannot make `replay` lie, and the auditor's path works from the defaults.

* A DeleteObject without a version id (allowed even under COMPLIANCE: a delete marker)
  does not make a session vanish: `replay ls` shows it DELETED and `replay verify --all`
  fails it (real moto_server with Object Lock).
* `replay` run where `bastion serve --dev` ran finds the recordings and the trusted key,
  and the evidence package's README instructions work as written (a real gateway, the real
  ssh client).
* The CLI: `replay --version`, `ls`/`list`, a help text for every option, `play --from`
  past the end refused with a message, `cat --input` on stdout.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import tarfile
import urllib.request
from pathlib import Path

import click
import pytest

from recorder.s3store import S3Store
from recorder.store import session_prefix
from tests.conftest import BASTION, wait_for
from tests.support.moto import MotoServer
from tests.support.openssh import free_port, run_ssh
from tests.test_recorder_faults import new_key, record_session

REPLAY = [sys.executable, "-m", "replay.cli"]


def replay(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*REPLAY, *args], capture_output=True, text=True, timeout=120, cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})


# -- delete markers ----------------------------------------------------------------------------


def test_delete_marker_does_not_hide_a_session(s3env: MotoServer, tmp_path: Path) -> None:
    bucket = s3env.make_bucket()
    url = f"s3://{bucket}/rec"
    store = S3Store.from_url(url, lock_mode="COMPLIANCE", retention=3600)
    key = new_key(tmp_path / "recording_key.pem")
    kept, _ = asyncio.run(record_session(store, tmp_path / "spool", key, lines=30))
    gone, _ = asyncio.run(record_session(store, tmp_path / "spool", key, lines=30))
    pem = tmp_path / "recording.pub"
    pem.write_text(key.public_pem())
    # "Delete" the metadata the way S3 allows under COMPLIANCE: no version id, a delete marker.
    for name in ("start.json", "manifest.json"):
        s3env.client().delete_object(Bucket=bucket, Key=f"rec/{session_prefix(gone)}{name}")
    assert not any(k.endswith(("start.json", "manifest.json")) for k in store.list(session_prefix(gone)))

    listed = replay("--recordings", url, "ls")
    assert listed.returncode == 0, listed.stderr
    row = next((line for line in listed.stdout.splitlines() if line.startswith(gone)), None)
    assert row is not None and "DELETED" in row, listed.stdout
    as_json = [json.loads(line) for line in replay("--recordings", url, "ls", "--json").stdout.splitlines()]
    entry = next(e for e in as_json if e["id"] == gone)
    assert entry["state"] == "DELETED" and entry["deleted"] == ["manifest.json", "start.json"]
    assert entry["identity"]["subject"] == "alice"  # the metadata, read from the hidden version

    verified = replay("--recordings", url, "verify", "--all", "--public-key", str(pem))
    assert verified.returncode == 1, verified.stdout + verified.stderr
    lines = dict(line.split(": ", 1) for line in verified.stdout.splitlines())
    assert lines[kept].startswith("OK")
    assert lines[gone].startswith("FAILED: manifest.json, start.json hidden by an S3 delete marker"), lines[gone]
    assert "1 verified, 1 failed" in verified.stderr
    single = replay("--recordings", url, "verify", gone, "--public-key", str(pem))
    assert single.returncode == 1 and "delete marker" in single.stdout

    # A deleted segment (the metadata intact) fails too.
    s3env.client().delete_object(Bucket=bucket, Key=f"rec/{session_prefix(kept)}seg-000000.zst")
    again = replay("--recordings", url, "verify", kept, "--public-key", str(pem))
    assert again.returncode == 1 and "seg-000000.zst" in again.stdout, again.stdout


# -- the auditor's path from the defaults -----------------------------------------------------------


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def test_replay_where_serve_dev_ran_finds_recordings_and_key(tmp_path: Path) -> None:
    ssh_port, http_port = free_port(), free_port()
    log = open(tmp_path / "serve.log", "wb")
    gw = subprocess.Popen([*BASTION, "serve", "--dev", "--ssh-listen", f"127.0.0.1:{ssh_port}",
                           "--http-listen", f"127.0.0.1:{http_port}",
                           "--kube-listen", f"127.0.0.1:{free_port()}"], cwd=tmp_path, stdin=subprocess.DEVNULL,
                          stdout=log, stderr=log, start_new_session=True)
    try:
        wait_for(lambda: _healthy(http_port) or gw.poll() is not None, 30, "serve --dev")
        assert gw.poll() is None, (tmp_path / "serve.log").read_text()
        token = subprocess.run([*BASTION, "dev-token", "--sub", "alice", "--group", "sre", "--gateway",
                                f"http://127.0.0.1:{http_port}"], capture_output=True, text=True, timeout=60,
                               check=True).stdout.strip()
        r = run_ssh(["-p", str(ssh_port), "demo@127.0.0.1", "echo auditor-path-$((6*7))"], token=token)
        assert r.returncode == 0 and b"auditor-path-42" in r.stdout, r.stderr
        wait_for(lambda: list((tmp_path / "guarita-data" / "recordings").glob("*/*/*/*/manifest.json")), 30,
                 "the manifest")
    finally:
        gw.terminate()
        gw.wait(30)
        log.close()

    verified = replay("verify", "--all", cwd=tmp_path)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "no trusted public key" not in verified.stderr and ": OK" in verified.stdout

    made = replay("evidence", "--subject", "alice", "-o", "pkg.tar.gz", cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    with tarfile.open(tmp_path / "pkg.tar.gz") as tar:
        readme = tar.extractfile("README.txt").read().decode()  # type: ignore[union-attr]
    assert "What is masked and what is not" in readme and "NOT masked" in readme and "Never masked" in readme
    assert re.search(r"masking (live|both|recording|none)", readme), readme
    # The README's own commands, as written (PACKAGE named), run in a fresh folder.
    block = readme.split("To check it without trusting whoever made it", 1)[1]
    commands = [line.strip() for line in block.splitlines() if line.startswith("    ") and line.strip()]
    assert commands and commands[0].startswith("mkdir evidence"), block
    shell = " && ".join(commands).replace("replay ", shlex.join(REPLAY) + " ")
    (tmp_path / "auditor").mkdir()
    (tmp_path / "pkg.tar.gz").rename(tmp_path / "auditor" / "pkg.tar.gz")
    ran = subprocess.run(["bash", "-c", shell], cwd=tmp_path / "auditor", capture_output=True, text=True,
                         timeout=120)
    assert ran.returncode == 0, shell + "\n" + ran.stdout + ran.stderr
    assert ": OK" in ran.stdout and "alice" in ran.stdout


# -- one CLI ----------------------------------------------------------------------------------------


def _options_without_help(cmd: click.Command, path: str) -> list[str]:
    missing = [f"{path} {p.opts[-1]}" for p in cmd.params
               if isinstance(p, click.Option) and not p.hidden and not p.help]
    if not (cmd.help or cmd.short_help):
        missing.append(f"{path} (no help)")
    if isinstance(cmd, click.Group):
        for name, sub in cmd.commands.items():
            missing += _options_without_help(sub, f"{path} {name}")
    return missing


def test_every_option_has_help_and_ls_list_are_one() -> None:
    from bastion.cli import main as bastion_main
    from replay.cli import main as replay_main

    assert _options_without_help(bastion_main, "bastion") + _options_without_help(replay_main, "replay") == []
    version = replay("--version")
    assert version.returncode == 0 and re.match(r"replay, version \d", version.stdout), version.stdout
    for group, path in ((replay_main, []), (bastion_main, ["sessions"]), (bastion_main, ["approvals"]),
                        (bastion_main, ["lock"])):
        for name in ("ls", "list"):
            cli = REPLAY if group is replay_main else BASTION
            r = subprocess.run([*cli, *path, name, "--help"], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "Usage:" in r.stdout, (path, name, r.stderr)


def test_play_from_past_the_end_and_cat_input_on_stdout(tmp_path: Path) -> None:
    from recorder.store import FileStore

    store = FileStore(tmp_path / "rec")
    key = new_key(tmp_path / "recording_key.pem")
    sid, _ = asyncio.run(record_session(store, tmp_path / "spool", key, lines=20))
    url = store.url
    past = replay("--recordings", url, "play", sid, "--from", "1h")
    assert past.returncode == 2 and "past the end" in past.stderr and "Traceback" not in past.stderr, past.stderr
    played = replay("--recordings", url, "play", sid, "--speed", "1000")
    assert played.returncode == 0, played.stderr
    assert re.search(r"playing from 0\.0s at speed x1000", played.stderr), played.stderr
    cat = replay("--recordings", url, "cat", sid, "--input")
    assert cat.returncode == 0 and "⌨ ls" in cat.stdout and "⌨" not in cat.stderr, cat.stdout[-500:]
    # Typed input sits between the output it came with, in order, on one stream.
    assert cat.stdout.index("00000 ") < cat.stdout.index("⌨ ls") < cat.stdout.index("00001 ")


@pytest.mark.parametrize("args", [["ls", "--approved"], ["list", "--approved"]])
def test_ls_approved_means_approved(args: list[str], tmp_path: Path) -> None:
    """A session whose approval was denied is not listed by --approved; one approved is."""
    from recorder import Recorder
    from recorder.store import FileStore
    from tests.test_recorder_faults import META

    async def record(outcome: str) -> str:
        rec = Recorder(FileStore(tmp_path / "rec"), tmp_path / "spool", new_key(tmp_path / "k.pem"))
        await rec.start()
        s = rec.open_session(META, term=(80, 24))
        s.marker("approval-request", request="r1", command="rm -rf /tmp/x")
        s.marker("approval-decision", request="r1", decision="deny" if outcome == "denied" else "approve")
        s.marker("command", command="rm -rf /tmp/x", mode="exec", outcome=outcome, rule="r", request="r1")
        s.exit(0)
        await s.close()
        await rec.wait_uploaded(10)
        await rec.close()
        return s.id

    denied, approved = asyncio.run(record("denied")), asyncio.run(record("approved"))
    listed = replay("--recordings", (tmp_path / "rec").as_uri(), *args)
    assert listed.returncode == 0, listed.stderr
    assert approved in listed.stdout and denied not in listed.stdout, listed.stdout


def test_play_in_a_terminal_shows_position_and_speed(tmp_path: Path) -> None:
    """Under a real pseudo-terminal: the title shows position and speed; `+` doubles the speed
    and the bottom bar says so."""
    from recorder.store import FileStore
    from tests.support.kube import PtyCommand

    store = FileStore(tmp_path / "rec")
    sid, _ = asyncio.run(record_session(store, tmp_path / "spool", new_key(tmp_path / "k.pem"), lines=20))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    with PtyCommand([*REPLAY, "--recordings", store.url, "play", sid, "--speed", "0.001"], env) as pty:
        pty.expect(rb"\x1b\]2;replay " + sid.encode() + rb": playing 0:00 / 0:00  speed x0\.001\x07")
        pty.send(b"+")
        pty.expect(rb"speed x0\.002  space pause")
        pty.send(b"q")
        assert pty.wait(15) == 0
