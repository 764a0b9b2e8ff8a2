"""A throwaway PostgreSQL cluster for tests and benches (real ``initdb`` + ``pg_ctl``).

``with PostgresCluster() as pg: pg.url`` -> ``postgresql://postgres@127.0.0.1:PORT/postgres``.
The cluster runs as the ``postgres`` OS user (PostgreSQL refuses to run as root) in a
fresh directory under /tmp that it owns, listens on 127.0.0.1 on a free port (retried
when another xdist worker took it first), with its socket in the same directory and
``fsync=off`` (a test database need not survive a power cut). ``stop()`` stops the
postmaster by its PID (``pg_ctl stop -m immediate``, then SIGKILL) and removes the
directory; an ``atexit`` hook stops whatever a test forgot.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from tests.support.openssh import free_port

PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin", "/usr/bin")
_live: set[PostgresCluster] = set()


def pg_tool(name: str) -> str:
    for d in PG_BIN_DIRS:
        path = Path(d) / name
        if os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found (install postgresql-15)")
    return found


def available() -> bool:
    try:
        pg_tool("initdb")
        pg_tool("pg_ctl")
        pwd.getpwnam("postgres")
    except (FileNotFoundError, KeyError):
        return False
    return True


def _as_postgres(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    user = pwd.getpwnam("postgres")

    def demote() -> None:  # runs in the child before exec
        os.setgid(user.pw_gid)
        os.setuid(user.pw_uid)

    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8", "HOME": "/tmp"}
    return subprocess.run(cmd, preexec_fn=demote if os.geteuid() == 0 else None, env=env,
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


@atexit.register
def _stop_leftovers() -> None:
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.stop()


class PostgresCluster:
    def __init__(self, start_timeout: float = 60) -> None:
        self.start_timeout = start_timeout
        self.dir: Path | None = None
        self.port = 0
        self.pid: int | None = None

    @property
    def data(self) -> Path:
        assert self.dir is not None
        return self.dir / "data"

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self) -> PostgresCluster:
        user = pwd.getpwnam("postgres")
        self.dir = Path(tempfile.mkdtemp(prefix="guarita-pg-", dir="/tmp"))
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        _live.add(self)
        r = _as_postgres([pg_tool("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
                          "-E", "UTF8", "--no-sync", "--locale=C.UTF-8"])
        if r.returncode != 0:
            self.stop()
            raise RuntimeError(f"initdb failed: {r.stdout}{r.stderr}")
        last = ""
        for _ in range(5):
            self.port = free_port()
            opts = (f"-k {self.dir} -p {self.port} -h 127.0.0.1 -c fsync=off -c synchronous_commit=off "
                    "-c full_page_writes=off -c max_connections=100")
            r = _as_postgres([pg_tool("pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.dir / "log"),
                              "-w", "-t", str(int(self.start_timeout)), "start"], timeout=self.start_timeout + 10)
            if r.returncode == 0:
                self.pid = int((self.data / "postmaster.pid").read_text().split()[0])
                return self
            last = self.log_text()
            if "could not bind" not in last and "already in use" not in last:
                break
        self.stop()
        raise RuntimeError(f"pg_ctl start failed:\n{r.stdout}{r.stderr}\n{last[-3000:]}")

    def log_text(self) -> str:
        try:
            return (self.dir / "log").read_text(errors="replace") if self.dir else ""
        except OSError:
            return ""

    def stop(self) -> None:
        _live.discard(self)
        if self.dir is None:
            return
        if self.pid is not None:
            _as_postgres([pg_tool("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"], timeout=30)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.02)
            if _alive(self.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
            self.pid = None
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (not our child: reaped by init soon) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
