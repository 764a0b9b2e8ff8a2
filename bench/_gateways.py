"""Helpers for bench/recording_overhead, bench/masking and bench/kube_exec.

Built on bench/_harness.py (one real sshd, the local OIDC issuer, the bare asyncssh pipe),
plus what those three need on top of it:

* :class:`Gateways`: any number of guarita processes in one run, each with its own data
  dir, config, extra TOML (``[masking]``, ``[[clusters]]``, ...), command-line flags and
  environment (e.g. ``--recordings s3://...`` with the moto endpoint), all against the
  same sshd target and the same issuer;
* a world-readable folder for files the target's login user reads (``cat FILE``);
* the machine description and load average every report starts with;
* ``py-spy record`` around a callable, summarised as the top functions.

Every process is started through ``Bench._spawn`` (own session, logged) and stopped by its
PID in ``Bench.close()``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from _harness import LOGIN, ROOT, TARGET, Bench, code_version, cpu_busy, pct, table, wait_banner

from tests.support.openssh import free_port


@dataclass
class Gateway:
    name: str
    dir: Path
    ssh_port: int
    http_port: int
    proc: subprocess.Popen
    kube_port: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def audit(self) -> Path:
        return self.dir / "audit.jsonl"

    @property
    def log(self) -> Path:
        return self.dir / "gateway.log"

    def events(self, name: str | None = None) -> list[dict]:
        import json

        if not self.audit.exists():
            return []
        out = []
        for line in self.audit.read_text().splitlines():
            with contextlib.suppress(ValueError):
                e = json.loads(line)
                if name is None or e.get("event") == name:
                    out.append(e)
        return out


def _port_open(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        return True
    return False


class Gateways(Bench):
    """A Bench whose guarita processes are started with :meth:`add_gateway`."""

    def __init__(self, cipher: str = "aes128-gcm@openssh.com", keep: bool = False) -> None:
        super().__init__(cipher, keep=keep)
        self.gateways: dict[str, Gateway] = {}
        self.shared: Path | None = None

    def start(self, gateway: bool = False, bare: bool = True, sshd: bool = True) -> Gateways:  # type: ignore[override]
        if sshd:
            super().start(gateway=False, bare=bare)
        self._start_issuer()
        return self

    def shared_dir(self) -> Path:
        """A folder the target's login user can read (files for `cat FILE` on the target)."""
        if self.shared is None:
            self.shared = Path(tempfile.mkdtemp(prefix="guarita-bench-files-"))
            self.shared.chmod(0o755)
        return self.shared

    def add_gateway(self, name: str, toml: str = "", args: tuple[str, ...] = (), env: dict[str, str] | None = None,
                    kube: bool = False, recording: str = "", timeout: float = 60) -> Gateway:
        """Start ``bastion serve --config`` with the bench target (when sshd runs), the
        issuer, an access rule for the bench identity, and ``toml`` appended at top level."""
        gdir = self.dir / name
        gdir.mkdir()
        ssh_port, http_port = free_port(), free_port()
        kube_port = free_port() if kube else None
        target = ""
        if self.sshd is not None:
            target = f"""
[[targets]]
name = "{TARGET}"
host = "127.0.0.1"
port = {self.sshd.port}
logins = ["{LOGIN}"]
host_keys = ["{self.sshd.host_key_line}"]
credential = "key"
private_key = "{self.key}"
"""
        config = gdir / "guarita.toml"
        config.write_text(f"""
[gateway]
data_dir = "{gdir}"
ssh_listen = "127.0.0.1:{ssh_port}"
http_listen = "127.0.0.1:{http_port}"
audit_log = "{gdir / 'audit.jsonl'}"

[recording]
url = "{(gdir / 'recordings').as_uri()}"
{recording}

[[oidc]]
issuer = "{self.issuer_url}"
audience = "guarita"
{target}
[[access]]
name = "bench"
subjects = ["bench"]
{'targets = ["' + TARGET + '"]' if self.sshd is not None else ''}
{'clusters = ["*"]' if kube else ''}

{toml}
""")
        exe = shutil.which("bastion") or sys.executable
        cmd = [exe] if exe.endswith("bastion") else [exe, "-m", "bastion.cli"]
        cmd += ["serve", "--config", str(config), *args]
        if kube_port:
            cmd += ["--kube-listen", f"127.0.0.1:{kube_port}"]
        proc = self._spawn(cmd, gdir / "gateway.log", env={**os.environ, **(env or {})}, cwd=str(gdir))
        self.gateways[name] = Gateway(name, gdir, ssh_port, http_port, proc, kube_port)
        gw = self.gateways[name]
        wait_banner(ssh_port, proc, gw.log, timeout)
        if kube_port:
            deadline = time.monotonic() + timeout
            while not _port_open(kube_port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kube front door of {name} not ready:\n{gw.log.read_text()[-3000:]}")
                time.sleep(0.05)
        return gw

    def ssh(self, where: str, *args: str, tty: bool = False) -> tuple[list[str], dict[str, str]]:
        """OpenSSH command for 'direct', 'bare' or the name of a gateway."""
        if where in ("direct", "bare"):
            cmd, env = self.ssh_cmd(where, *args)
        else:
            self.gw_port = self.gateways[where].ssh_port
            cmd, env = self.ssh_cmd("guarita", *args)
        if tty:
            cmd.insert(1, "-tt")
        return cmd, env

    def pid(self, where: str) -> int | None:
        if where == "bare":
            return self.bare.pid if self.bare else None
        gw = self.gateways.get(where)
        return gw.proc.pid if gw else None

    def close(self) -> None:
        super().close()
        if self.shared is not None and not self.keep:
            shutil.rmtree(self.shared, ignore_errors=True)


# -- what each report starts with ------------------------------------------------------------


def machine() -> str:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    return (f"machine: {os.cpu_count()} CPUs ({cpu}), {mem} RAM, Python {platform.python_version()}, "
            f"{platform.system()} {platform.release()}")


def load_note() -> str:
    """Load average and CPU busy share right before a measurement (the machine is shared)."""
    la = os.getloadavg()
    busy = cpu_busy(1.0)
    warn = "  WARNING: other load, numbers will be noisy" if busy > 0.1 else ""
    return f"load average {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; CPU busy {100 * busy:.0f}% of {os.cpu_count()}{warn}"


def header(name: str) -> str:
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    return f"{name}: {date}\n{machine()}\n{code_version()}"


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU seconds of a process and its reaped children (0 if gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# -- py-spy -------------------------------------------------------------------------------------


def spy(pid: int, run: Callable[[], object], out: Path, top: int = 12, rate: int = 200) -> str:
    """Run ``run()`` while ``py-spy record`` samples ``pid``; the top functions by self time
    (and inclusive time), as a share of the samples of the busiest thread group."""
    if not shutil.which("py-spy"):
        return "py-spy not installed (pip install py-spy): no profile"
    out.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["py-spy", "record", "--nonblocking", "--nolineno", "--format", "raw", "-r", str(rate),
                             "-o", str(out), "-p", str(pid)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(1.0)  # let py-spy attach
        t0 = time.perf_counter()
        run()
        elapsed = time.perf_counter() - t0
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if not out.exists():
        err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        return f"py-spy wrote nothing: {err.strip()[-500:]}"
    selfc: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n, frames = int(count), stack.split(";")
        total += n
        selfc[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    wall = rate * elapsed
    rows = [[f"{100 * n / wall:.1f}%", f"{100 * incl[f] / wall:.1f}%", f[:110]] for f, n in selfc.most_common(top)]
    return (f"py-spy ({total} samples over {elapsed:.1f} s; % of wall time, 100% = one thread always busy; "
            f"raw stacks: {out})\n" + table(["self", "incl.", "function (file)"], rows))


__all__ = ["ROOT", "Gateway", "Gateways", "cpu_seconds", "header", "load_note", "machine", "pct", "spy"]
