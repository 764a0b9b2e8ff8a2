"""One gateway per data dir and per spool: a second ``bastion serve`` refuses to start
before it touches anything, and the first one goes on serving (real processes)."""

from __future__ import annotations

import os
import subprocess
import urllib.request
from pathlib import Path

from tests.conftest import BASTION, free_port, wait_for


def _dev_serve(data_dir: Path, log: Path) -> tuple[subprocess.Popen[bytes], int]:
    http = free_port()
    with open(log, "ab") as out:
        proc = subprocess.Popen([*BASTION, "serve", "--dev", "--data-dir", str(data_dir),
                                 "--ssh-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http}",
                                 "--kube-listen", f"127.0.0.1:{free_port()}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)
    return proc, http


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def _snapshot(d: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in d.rglob("*"):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(d))] = (st.st_size, st.st_mtime_ns)
    return out


def test_second_serve_on_the_same_data_dir_or_spool_refuses(tmp_path: Path) -> None:
    data = tmp_path / "data"
    first, http = _dev_serve(data, tmp_path / "first.log")
    try:
        wait_for(lambda: _healthy(http) or first.poll() is not None, 30, "the first gateway")
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        # What a live session of the first gateway looks like in the spool: a second gateway
        # that "recovered" it would seal it (a manifest) behind the first one's back.
        live = data / "spool" / "20260101-000000-0123abcd"
        live.mkdir()
        (live / "meta.json").write_text('{"id": "20260101-000000-0123abcd"}')
        before = _snapshot(data / "spool")

        # Same data dir.
        second = subprocess.run([*BASTION, "serve", "--dev", "--data-dir", str(data),
                                 "--ssh-listen", f"127.0.0.1:{free_port()}",
                                 "--http-listen", f"127.0.0.1:{free_port()}",
                                 "--kube-listen", f"127.0.0.1:{free_port()}"],
                                capture_output=True, text=True, timeout=60)
        assert second.returncode == 1
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, second.stderr
        assert str(data.resolve()) in lines[0] and f"pid {first.pid}" in lines[0], lines[0]
        assert _snapshot(data / "spool") == before, "the refused gateway touched the spool"

        # Another data dir, but the first one's spool.
        other = tmp_path / "other"
        other.mkdir()
        config = other / "guarita.toml"
        config.write_text("\n".join([
            "[gateway]", f'data_dir = "{other}"', "", "[recording]", f'spool_dir = "{data / "spool"}"', "",
            "[[oidc]]", 'issuer = "http://127.0.0.1:9/nowhere"', 'audience = "guarita"', ""]))
        third = subprocess.run([*BASTION, "serve", "--config", str(config),
                                "--ssh-listen", f"127.0.0.1:{free_port()}",
                                "--http-listen", f"127.0.0.1:{free_port()}"],
                               capture_output=True, text=True, timeout=60)
        assert third.returncode == 1, third.stderr
        assert str((data / "spool").resolve()) in third.stderr and f"pid {first.pid}" in third.stderr
        assert not (other / "state.db").exists() and not (other / "ssh_host_ed25519_key").exists()
        assert _snapshot(data / "spool") == before
        assert (data / ".guarita.lock").read_text().strip() == str(first.pid)
        assert first.poll() is None and _healthy(http)
    finally:
        first.terminate()
        first.wait(30)
    # Released with the process: a new gateway starts on the same dir.
    again, http2 = _dev_serve(data, tmp_path / "again.log")
    try:
        wait_for(lambda: _healthy(http2) or again.poll() is not None, 30, "the restarted gateway")
        assert again.poll() is None, (tmp_path / "again.log").read_text()
    finally:
        again.terminate()
        again.wait(30)
    assert os.path.exists(data / ".guarita.lock")
