"""Proves tests/support/openssh.py against the real OpenSSH sshd and ssh (no gateway)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.openssh import (
    PtySsh,
    SshdStartError,
    SshdTarget,
    ensure_login_user,
    free_port,
    keygen,
    public_key_line,
    run_ssh,
)


@pytest.fixture(scope="module")
def login_user() -> str:
    return ensure_login_user()


@pytest.fixture
def client_key(tmp_path: Path) -> Path:
    return keygen(tmp_path / "client" / "id_ed25519")


@pytest.fixture
def target(tmp_path: Path, client_key: Path) -> Iterator[SshdTarget]:
    sshd = SshdTarget(tmp_path / "target", authorized_keys=[public_key_line(client_key)])
    try:
        yield sshd.start()
    finally:
        sshd.stop()


def dest(target: SshdTarget, user: str) -> list[str]:
    return ["-p", str(target.port), f"{user}@{target.host}"]


def test_target_is_listening_with_pinned_host_key(target: SshdTarget) -> None:
    assert target.host == "127.0.0.1"
    assert target.host_key_line.startswith("ssh-ed25519 AAAA")
    scan = subprocess.run(
        ["ssh-keyscan", "-T", "5", "-t", "ed25519", "-p", str(target.port), target.host],
        capture_output=True,
        timeout=30,
    )
    assert target.host_key_line.encode() in scan.stdout


def test_exec_exit_code_and_separate_streams(
    target: SshdTarget, client_key: Path, login_user: str
) -> None:
    res = run_ssh(
        [*dest(target, login_user), "echo hi; echo oops >&2; exit 3"], identity=client_key
    )
    assert res.returncode == 3, res
    assert res.stdout == b"hi\n"
    assert b"oops" in res.stderr
    assert b"oops" not in res.stdout


def test_exec_stdin_and_accepted_env(target: SshdTarget, client_key: Path, login_user: str) -> None:
    res = run_ssh(
        [
            "-o",
            "SendEnv=GUARITA_TEST_VALUE",
            *dest(target, login_user),
            'printf "%s|" "$GUARITA_TEST_VALUE" "$(id -un)"; cat',
        ],
        identity=client_key,
        input=b"from stdin\n",
        env={"GUARITA_TEST_VALUE": "passed-through"},
    )
    assert res.returncode == 0, res
    assert res.stdout == f"passed-through|{login_user}|from stdin\n".encode()


def test_interactive_pty_session_and_resize(
    target: SshdTarget, client_key: Path, login_user: str
) -> None:
    with PtySsh(["-tt", *dest(target, login_user)], identity=client_key) as term:
        term.expect(rb"[$#] ")
        term.send(b"stty size\r")
        term.expect(rb"24 80\r?\n")
        term.resize(100, 30)
        term.send(b"stty size\r")
        term.expect(rb"30 100\r?\n")
        term.send(b"exit\r")
        assert term.wait() == 0
        assert b"24 80" in term.output()


def test_certificate_accepted_plain_key_refused(tmp_path: Path, login_user: str) -> None:
    ca = keygen(tmp_path / "ca" / "ca")
    user_key = keygen(tmp_path / "user" / "id_ed25519")
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-s",
            str(ca),
            "-I",
            "keyid",
            "-n",
            login_user,
            "-V",
            "+5m",
            f"{user_key}.pub",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    assert Path(f"{user_key}-cert.pub").exists()
    # The same private key without its certificate next to it.
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    plain_key = plain_dir / "id_ed25519"
    shutil.copy(user_key, plain_key)
    shutil.copy(f"{user_key}.pub", f"{plain_key}.pub")

    with SshdTarget(tmp_path / "target", trusted_user_ca_keys=[public_key_line(ca)]) as sshd:
        ok = run_ssh([*dest(sshd, login_user), "echo cert-ok"], identity=user_key)
        assert ok.returncode == 0, (ok, sshd.log_text())
        assert ok.stdout == b"cert-ok\n"
        assert "ID keyid" in sshd.log_text()

        refused = run_ssh([*dest(sshd, login_user), "echo no"], identity=plain_key)
        assert refused.returncode == 255
        assert b"Permission denied" in refused.stderr
        assert refused.stdout == b""


def test_askpass_token_answers_prompts(tmp_path: Path, login_user: str) -> None:
    # sshd here has no password auth, so prove the askpass path with a
    # passphrase-protected key: ssh asks the helper, which prints the token.
    token = "s3cret-token"
    key = tmp_path / "enc" / "id_ed25519"
    key.parent.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", token, "-f", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    with SshdTarget(tmp_path / "t2", authorized_keys=[public_key_line(key)]) as sshd:
        res = run_ssh([*dest(sshd, login_user), "echo unlocked"], identity=key, token=token)
        assert res.returncode == 0, res
        assert res.stdout == b"unlocked\n"
        wrong = run_ssh([*dest(sshd, login_user), "echo x"], identity=key, token="wrong")
        assert wrong.returncode == 255


def test_run_ssh_timeout_kills_client(
    target: SshdTarget, client_key: Path, login_user: str
) -> None:
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        run_ssh([*dest(target, login_user), "sleep 60"], identity=client_key, timeout=2)
    assert time.monotonic() - started < 15


def test_bad_config_raises_with_log(tmp_path: Path) -> None:
    sshd = SshdTarget(tmp_path, extra_config="NoSuchOption yes\n")
    with pytest.raises(SshdStartError, match="NoSuchOption"):
        sshd.start()
    sshd.stop()


def test_stop_frees_port(tmp_path: Path) -> None:
    sshd = SshdTarget(tmp_path).start()
    pid, port = sshd.pid, sshd.port
    assert pid is not None
    sshd.stop()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert sshd.pid is None


def test_free_port_is_bindable() -> None:
    port = free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
