"""Shared set-up for the bench scripts: one real sshd target, a local OIDC issuer, guarita
started from a config file (recording on, file:// store) and the bare asyncssh pipe.

Every process is started here and stopped by its PID in ``Bench.close()``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bastion.identity.devissuer import DevIssuer  # noqa: E402
from tests.support.openssh import SshdTarget, ensure_login_user, free_port, keygen  # noqa: E402

LOGIN = "guarita-bench"
TARGET = "bench"
SSH = "/usr/bin/ssh"


def wait_banner(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            if s.recv(64).startswith(b"SSH-"):
                return
        time.sleep(0.05)
    raise RuntimeError(f"port {port} not ready after {timeout}s:\n{log.read_text(errors='replace')[-3000:]}")


class Bench:
    def __init__(self, cipher: str, keep: bool = False, bare_upstream_cipher: str | None = None,
                 recording: str = "", recording_url: str | None = None, extra_toml: str = "",
                 gateway_env: dict[str, str] | None = None) -> None:
        self.cipher = cipher
        self.recording_toml = recording  # extra TOML lines for guarita's [recording] table
        self.recording_url = recording_url  # default: a file:// folder in the work directory
        self.extra_toml = extra_toml  # more tables for guarita's config (e.g. [limits])
        self.gateway_env = gateway_env  # added to guarita's environment (e.g. S3 credentials)
        # The bare pipe's pipe->sshd leg: the client's cipher unless told otherwise ("" = asyncssh's default).
        self.bare_upstream_cipher = cipher if bare_upstream_cipher is None else bare_upstream_cipher
        self.keep = keep
        self.dir = Path(tempfile.mkdtemp(prefix="guarita-bench-"))
        self.procs: list[subprocess.Popen] = []
        self.sshd: SshdTarget | None = None
        self.httpd: ThreadingHTTPServer | None = None
        self.gateway: subprocess.Popen | None = None
        self.bare: subprocess.Popen | None = None

    # -- set-up ---------------------------------------------------------------------------

    def start(self, gateway: bool = True, bare: bool = True) -> Bench:
        ensure_login_user(LOGIN)
        self.key = keygen(self.dir / "client_key")  # used by the direct client, guarita and the bare pipe
        pub = (self.dir / "client_key.pub").read_text().split()
        self.sshd = SshdTarget(self.dir, authorized_keys=[" ".join(pub[:2])]).start()
        if bare:
            self.bare_port = free_port()
            log = self.dir / "bare.log"
            self.bare = self._spawn([sys.executable, str(ROOT / "bench" / "bare_pipe.py"), "--port",
                                     str(self.bare_port), "--target-port", str(self.sshd.port), "--key",
                                     str(self.key), "--upstream-cipher", self.bare_upstream_cipher], log)
            wait_banner(self.bare_port, self.bare, log)
        if gateway:
            self._start_issuer()
            self._start_gateway()
        return self

    def _spawn(self, cmd: list[str], log: Path, **kw) -> subprocess.Popen:
        with open(log, "wb") as out:
            proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def _start_issuer(self) -> None:
        port = free_port()
        issuer = DevIssuer(self.dir / "issuer_key.pem", f"http://127.0.0.1:{port}", "guarita")
        docs = {"/.well-known/openid-configuration": issuer.discovery(), "/jwks": issuer.jwks()}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                body = json.dumps(docs.get(self.path, {})).encode()
                self.send_response(200 if self.path in docs else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.issuer_url = issuer.issuer_url
        self.token = issuer.mint("bench", groups=["bench"], ttl=6 * 3600)

    def _start_gateway(self) -> None:
        assert self.sshd is not None
        self.gw_port, http_port = free_port(), free_port()
        self.http_port = http_port  # the HTTP API (and the MCP door at /mcp)
        data = self.dir / "gw"
        self.recordings = self.dir / "recordings"
        self.audit = data / "audit.jsonl"
        config = self.dir / "guarita.toml"
        config.write_text(f"""
[gateway]
data_dir = "{data}"
ssh_listen = "127.0.0.1:{self.gw_port}"
http_listen = "127.0.0.1:{http_port}"
audit_log = "{self.audit}"

[recording]
url = "{self.recording_url or self.recordings.as_uri()}"
{self.recording_toml}
{self.extra_toml}

[[oidc]]
issuer = "{self.issuer_url}"
audience = "guarita"

[[targets]]
name = "{TARGET}"
host = "127.0.0.1"
port = {self.sshd.port}
logins = ["{LOGIN}"]
host_keys = ["{self.sshd.host_key_line}"]
credential = "key"
private_key = "{self.key}"

[[access]]
name = "bench"
subjects = ["bench"]
targets = ["{TARGET}"]
""")
        exe = shutil.which("bastion") or sys.executable
        cmd = [exe] if exe.endswith("bastion") else [exe, "-m", "bastion.cli"]
        log = self.dir / "gateway.log"
        env = {**os.environ, **self.gateway_env} if self.gateway_env else None
        self.gateway = self._spawn([*cmd, "serve", "--config", str(config)], log, env=env)
        wait_banner(self.gw_port, self.gateway, log)

    # -- clients --------------------------------------------------------------------------

    def ssh_cmd(self, path: str, *args: str) -> tuple[list[str], dict[str, str]]:
        """OpenSSH client command line and environment for path 'direct', 'bare' or 'guarita'."""
        assert self.sshd is not None
        cmd = [SSH, "-F", "/dev/null", "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
               "-o", "LogLevel=ERROR", "-o", "Compression=no", "-c", self.cipher, "-o", "IdentitiesOnly=yes"]
        env = {k: v for k, v in os.environ.items() if k not in ("SSH_AUTH_SOCK", "SSH_ASKPASS")}
        if path == "direct":
            cmd += ["-i", str(self.key), "-o", "PreferredAuthentications=publickey",
                    "-p", str(self.sshd.port), f"{LOGIN}@127.0.0.1"]
        else:
            askpass = self.dir / "askpass"
            askpass.write_text('#!/bin/sh\nprintf "%s\\n" "$BENCH_SECRET"\n')
            askpass.chmod(0o700)
            env.update(SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force",
                       BENCH_SECRET=self.token if path == "guarita" else "anything")
            port = self.gw_port if path == "guarita" else self.bare_port
            user = f"{LOGIN}@{TARGET}" if path == "guarita" else LOGIN
            cmd += ["-o", "PreferredAuthentications=keyboard-interactive,password", "-p", str(port),
                    f"{user}@127.0.0.1"]
        return cmd + list(args), env

    def server_pid(self, path: str) -> int | None:
        proc = {"guarita": self.gateway, "bare": self.bare}.get(path)
        return proc.pid if proc else None

    def session_ends(self) -> list[dict]:
        """guarita's session.end audit events (with the recorded byte counts)."""
        if not self.audit.exists():
            return []
        events = [json.loads(line) for line in self.audit.read_text().splitlines() if line.strip()]
        return [e for e in events if e.get("event") == "session.end"]

    # -- tear-down ------------------------------------------------------------------------

    def close(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
        if self.sshd is not None:
            self.sshd.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Bench:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def cpu_busy(seconds: float = 1.0) -> float:
    """Share of the machine's CPU time that was busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(f), f[3] + f[4]
    (t0, i0), _ = sample(), time.sleep(seconds)
    t1, i1 = sample()
    return 1 - (i1 - i0) / max(1, t1 - t0)


def code_version() -> str:
    """The guarita commit being measured, and whether product code has uncommitted edits."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True).stdout.strip()
    dirty = git("status", "--short", "--", "bastion", "recorder").splitlines()
    return f"guarita {git('rev-parse', '--short', 'HEAD') or '?'}" + (
        f" + uncommitted edits in {', '.join(x.split()[-1] for x in dirty)}" if dirty else "")


def quiet_note() -> str:
    busy = cpu_busy()
    note = code_version() + f"; machine CPU busy before the run: {100 * busy:.0f}% of {os.cpu_count()} cores"
    return note + ("  WARNING: other load, numbers will be noisy" if busy > 0.1 else "")


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(p / 100 * len(s) + 0.5)) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values)


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])
