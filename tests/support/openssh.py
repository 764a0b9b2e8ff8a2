"""Test helpers around the real OpenSSH server (``sshd``) and client (``ssh``).

* :func:`ensure_login_user` creates the local unix account that targets log in as.
* :func:`keygen` makes key pairs with ``ssh-keygen``.
* :class:`SshdTarget` runs a real ``/usr/sbin/sshd`` on 127.0.0.1 with its own
  configuration, host key, log and authorized keys (never ``/etc/ssh``).
* :func:`run_ssh` runs the real ``/usr/bin/ssh`` non-interactively.
* :class:`PtySsh` runs the real ``ssh`` under a real pseudo-terminal.

Everything is safe under pytest-xdist: unique temporary directories, free ports
(with a retry when another worker grabs the port first), a file lock around
account creation, and every process is stopped by its PID (an ``atexit`` hook
stops whatever a test forgot).

Synchronisation never relies on fixed sleeps: readiness is polled against a
deadline with a tiny backoff.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import errno
import fcntl
import os
import pwd
import re
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import termios
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

SSHD = "/usr/sbin/sshd"
SSH = "/usr/bin/ssh"
SSH_KEYGEN = "/usr/bin/ssh-keygen"
LOOPBACK = "127.0.0.1"

#: Environment variable that carries the token to the askpass helper (never argv / file).
TOKEN_ENV = "GUARITA_TEST_TOKEN"

_USER_LOCK = Path(tempfile.gettempdir()) / "guarita-test-useradd.lock"

# Safety net: whatever a test forgot to stop is stopped at interpreter exit.
_live: set[SshdTarget | PtySsh] = set()
_live_lock = threading.Lock()


def _register(obj: SshdTarget | PtySsh) -> None:
    with _live_lock:
        _live.add(obj)


def _unregister(obj: SshdTarget | PtySsh) -> None:
    with _live_lock:
        _live.discard(obj)


@atexit.register
def _stop_leftovers() -> None:
    with _live_lock:
        leftovers = list(_live)
    for obj in leftovers:
        with contextlib.suppress(Exception):
            if isinstance(obj, SshdTarget):
                obj.stop()
            else:
                obj.close()


def _tool(path: str) -> str:
    """Absolute path of an OpenSSH binary, falling back to ``$PATH`` lookup."""
    if os.access(path, os.X_OK):
        return path
    found = shutil.which(os.path.basename(path))
    if found is None:
        raise FileNotFoundError(f"{path} not found (is openssh-server/openssh-client installed?)")
    return found


# ---------------------------------------------------------------------------
# Accounts and keys
# ---------------------------------------------------------------------------


def _shadow_password_field(name: str) -> str | None:
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                fields = line.rstrip("\n").split(":")
                if fields and fields[0] == name and len(fields) > 1:
                    return fields[1]
    except OSError:
        return None
    return None


def ensure_login_user(name: str = "guarita-test") -> str:
    """Make sure a local unix account ``name`` exists and can log in over SSH.

    The account is created with ``useradd -m -s /bin/bash`` when missing and
    unlocked with ``usermod -p '*'`` (``useradd`` leaves the password field as
    ``!``, which sshd with ``UsePAM no`` treats as a locked account; ``*`` means
    "no password, but not locked").  Idempotent, and serialised across
    processes (pytest-xdist workers) with an ``fcntl`` lock in ``/tmp``.

    Requires root.  Returns ``name``.
    """
    if os.geteuid() != 0:
        raise PermissionError("ensure_login_user needs root (useradd/usermod)")
    with open(_USER_LOCK, "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            try:
                pwd.getpwnam(name)
            except KeyError:
                subprocess.run(
                    ["useradd", "-m", "-s", "/bin/bash", name],
                    check=True,
                    capture_output=True,
                    timeout=60,
                )
            field = _shadow_password_field(name)
            if field is None or field.startswith("!"):
                subprocess.run(
                    ["usermod", "-p", "*", name], check=True, capture_output=True, timeout=60
                )
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return name


def keygen(path: Path, kind: str = "ed25519", *, comment: str = "guarita-test") -> Path:
    """Create a key pair with ``ssh-keygen -q -N ''`` at ``path`` (``path.pub`` too).

    Parent directories are created.  Refuses to overwrite an existing key
    (``FileExistsError``).  Returns the private key path.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [_tool(SSH_KEYGEN), "-q", "-N", "", "-t", kind, "-C", comment, "-f", str(path)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    return path


def public_key_line(path: Path) -> str:
    """``"TYPE BASE64"`` of a public key file (or of ``<private>.pub``), comment dropped."""
    path = Path(path)
    if path.suffix != ".pub":
        path = path.with_name(path.name + ".pub")
    fields = path.read_text().split()
    return " ".join(fields[:2])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------------------
# sshd targets
# ---------------------------------------------------------------------------


_PR_SET_CHILD_SUBREAPER = 36
try:
    _libc: ctypes.CDLL | None = ctypes.CDLL(None, use_errno=True)
except OSError:  # pragma: no cover - non-glibc platforms
    _libc = None


def _become_subreaper() -> None:  # runs in the sshd child between fork and exec
    """Make sshd the reaper of its orphaned descendants (preserved across execve).

    Remote commands that survive their connection (``sleep 60`` after the
    client was killed) are then re-parented to our sshd instead of PID 1, so
    :meth:`SshdTarget.stop` finds and ends them by PID, and sshd reaps them.
    """
    if _libc is not None:
        _libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _proc_state(pid: int) -> tuple[str, int] | None:
    """(state letter, ppid) of ``pid`` or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            data = fh.read()
    except OSError:
        return None
    fields = data[data.rfind(")") + 2 :].split()
    return fields[0], int(fields[1])


def _proc_descendants(pid: int) -> list[int]:
    """All descendants of ``pid``, parents before children."""
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = _proc_children(todo.pop(0))
        out.extend(kids)
        todo.extend(kids)
    return out


def _proc_children(pid: int) -> list[int]:
    """Direct children of ``pid`` (Linux ``/proc/PID/task/*/children``)."""
    kids: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return kids
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as fh:
                kids.extend(int(x) for x in fh.read().split())
        except (OSError, ValueError):
            continue
    return kids


def _split_match(config: str) -> tuple[str, str]:
    """Split extra config into (global part, part starting at the first ``Match``)."""
    lines = config.splitlines()
    for i, line in enumerate(lines):
        if line.strip().lower().startswith("match "):
            return "\n".join(lines[:i]), "\n".join(lines[i:])
    return config, ""


class SshdStartError(RuntimeError):
    """sshd exited or never became ready; the message carries its log."""


class SshdTarget:
    """A real ``/usr/sbin/sshd`` on 127.0.0.1 with its own config in a temp dir.

    Files (config, host key, pid file, log) live in a fresh unique directory
    under ``workdir``.  ``authorized_keys`` lines go to a file that sshd reads
    *as the login user*; pytest's ``tmp_path`` is under a 0700 root-owned
    directory the login user cannot traverse, so that file is kept in a
    separate world-traversable ``/tmp/guarita-sshd-keys-*`` directory that
    :meth:`stop` removes.  ``TrustedUserCAKeys`` is read by root and stays in
    the work directory.

    ``extra_config`` is placed *before* the defaults (in sshd_config the first
    value of a keyword wins, so it can override them); anything from its first
    ``Match`` line on is appended at the end instead.

    Use as a context manager, or call :meth:`start` / :meth:`stop`.
    """

    host: str
    port: int
    host_key_line: str

    def __init__(
        self,
        workdir: Path,
        *,
        authorized_keys: Iterable[str] = (),
        trusted_user_ca_keys: Iterable[str] = (),
        port: int | None = None,
        extra_config: str = "",
        start_timeout: float = 10.0,
    ) -> None:
        self.workdir = Path(workdir)
        self.authorized_keys = [k.strip() for k in authorized_keys]
        self.trusted_user_ca_keys = [k.strip() for k in trusted_user_ca_keys]
        self.host = LOOPBACK
        self._requested_port = port
        self.port = port or 0
        self.extra_config = extra_config
        self.start_timeout = start_timeout
        self.host_key_line = ""
        self.dir: Path | None = None
        self.config_path: Path | None = None
        self.log_path: Path | None = None
        self.pid_path: Path | None = None
        self.host_key_path: Path | None = None
        self.authorized_keys_path: Path | None = None
        self._keys_dir: Path | None = None
        self.proc: subprocess.Popen[bytes] | None = None

    # -- public -------------------------------------------------------------

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def start(self) -> SshdTarget:
        """Write the configuration, start sshd and wait until it speaks SSH.

        Raises :class:`SshdStartError` (with the sshd log) if it exits or is
        not ready within ``start_timeout`` seconds.  When the port was picked
        automatically and another process took it first, retries on a new one.
        """
        if self.proc is not None:
            raise RuntimeError("sshd target already started")
        self._prepare()
        attempts = 1 if self._requested_port else 5
        for attempt in range(attempts):
            self.port = self._requested_port or free_port()
            self._write_config()
            try:
                self._spawn_and_wait()
                return self
            except SshdStartError as exc:
                log = self.log_text()
                self._kill_proc()
                bind_race = "Address already in use" in log or "Cannot bind any address" in log
                if attempt + 1 >= attempts or not bind_race:
                    self._cleanup_keys_dir()
                    raise exc
        raise AssertionError("unreachable")

    def log_text(self) -> str:
        """Everything sshd wrote to its log (stderr, ``-e``) so far."""
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Stop sshd (by PID: SIGTERM, wait, SIGKILL on timeout) and its sessions."""
        self._kill_proc()
        self._cleanup_keys_dir()

    def __enter__(self) -> SshdTarget:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<SshdTarget {self.host}:{self.port} pid={self.pid} dir={self.dir}>"

    # -- internals ----------------------------------------------------------

    def _prepare(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix="sshd-", dir=self.workdir))
        self.config_path = self.dir / "sshd_config"
        self.log_path = self.dir / "sshd.log"
        self.pid_path = self.dir / "sshd.pid"
        self.host_key_path = keygen(self.dir / "ssh_host_ed25519_key", comment="guarita-target")
        self.host_key_line = public_key_line(self.host_key_path)

        # sshd reads AuthorizedKeysFile with the login user's uid: keep it out
        # of pytest's 0700 tmp tree.
        self._keys_dir = Path(tempfile.mkdtemp(prefix="guarita-sshd-keys-"))
        os.chmod(self._keys_dir, 0o755)
        self.authorized_keys_path = self._keys_dir / "authorized_keys"
        self.authorized_keys_path.write_text("".join(k + "\n" for k in self.authorized_keys))
        os.chmod(self.authorized_keys_path, 0o644)

        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)

    def _write_config(self) -> None:
        assert self.dir is not None and self.config_path is not None
        head, match_blocks = _split_match(self.extra_config)
        lines = ["# generated by tests/support/openssh.py", head.strip(), ""]
        lines += [
            f"ListenAddress {self.host}",
            f"HostKey {self.host_key_path}",
            f"PidFile {self.pid_path}",
            f"AuthorizedKeysFile {self.authorized_keys_path}",
            "UsePAM no",
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PubkeyAuthentication yes",
            "AcceptEnv LANG LC_* GUARITA_TEST_*",
            "AllowTcpForwarding yes",
            "Subsystem sftp internal-sftp",
            "LogLevel VERBOSE",
            "PrintMotd no",
            "PrintLastLog no",
            "MaxStartups 200",
            "MaxSessions 100",
        ]
        if self.trusted_user_ca_keys:
            ca_path = self.dir / "trusted_user_ca_keys"
            ca_path.write_text("".join(k + "\n" for k in self.trusted_user_ca_keys))
            lines.append(f"TrustedUserCAKeys {ca_path}")
        if match_blocks:
            lines += ["", match_blocks.strip()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _spawn_and_wait(self) -> None:
        assert self.config_path is not None and self.log_path is not None
        with open(self.log_path, "wb") as log:  # one log per attempt
            self.proc = subprocess.Popen(
                [_tool(SSHD), "-D", "-e", "-f", str(self.config_path), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
                preexec_fn=_become_subreaper,
            )
        _register(self)
        deadline = time.monotonic() + self.start_timeout
        delay = 0.005
        last_error = "not tried"
        while True:
            rc = self.proc.poll()
            if rc is not None:
                raise SshdStartError(
                    f"sshd exited with {rc} before becoming ready on port {self.port};"
                    f" log:\n{self.log_text()}"
                )
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise SshdStartError(
                    f"sshd not ready on {self.host}:{self.port} after {self.start_timeout}s"
                    f" ({last_error}); log:\n{self.log_text()}"
                )
            try:
                banner = _read_banner(self.host, self.port, min(remaining, 2.0))
                if banner.startswith(b"SSH-"):
                    return
                last_error = f"unexpected banner {banner!r}"
            except OSError as exc:
                last_error = repr(exc)
            time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
            delay = min(delay * 2, 0.1)

    def _kill_proc(self) -> None:
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        try:
            if proc.poll() is None:
                self._kill_descendants(proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=5)
        finally:
            _unregister(self)

    @staticmethod
    def _kill_descendants(pid: int) -> None:
        """End every descendant of the sshd listener by PID, then let sshd reap them.

        Per-connection sshd processes and user sessions call setsid(), so they
        are not in our process group.  They are killed while the listener is
        still alive (it is their reaper), and we wait until they are gone so
        no zombie is left to PID 1.
        """
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            alive = [p for p in _proc_descendants(pid) if (st := _proc_state(p)) and st[0] != "Z"]
            if not alive:
                break
            for p in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(p, signal.SIGKILL)
            time.sleep(0.01)
        # Give the listener a moment to reap (its SIGCHLD handler), no longer.
        while time.monotonic() < deadline and _proc_children(pid):
            time.sleep(0.01)

    def _cleanup_keys_dir(self) -> None:
        if self._keys_dir is not None:
            shutil.rmtree(self._keys_dir, ignore_errors=True)
            self._keys_dir = None


def _read_banner(host: str, port: int, timeout: float) -> bytes:
    """Connect and read the server's SSH identification line."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        data = b""
        while b"\n" not in data and len(data) < 1024:
            chunk = s.recv(256)
            if not chunk:
                break
            data += chunk
        return data


# ---------------------------------------------------------------------------
# ssh client
# ---------------------------------------------------------------------------

_ASKPASS_SCRIPT = f"""#!/bin/sh
# Prints the token for OpenSSH's SSH_ASKPASS; the token itself only lives in
# the environment of the ssh process, never in argv or in this file.
printf '%s\\n' "${TOKEN_ENV}"
"""


def _prepare_ssh(
    args: Sequence[str],
    *,
    token: str | None,
    identity: Path | None,
    env: Mapping[str, str] | None,
    tmpdir: Path,
) -> tuple[list[str], dict[str, str]]:
    """Build the ssh command line and environment (askpass helper in ``tmpdir``)."""
    cmd = [
        _tool(SSH),
        "-F",
        "/dev/null",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "GlobalKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=no",
        "-o",
        "ConnectTimeout=10",
    ]
    full_env = dict(os.environ)
    # Never let a developer's agent or an outer askpass leak into the test.
    for key in ("SSH_AUTH_SOCK", "SSH_ASKPASS", "SSH_ASKPASS_REQUIRE", TOKEN_ENV):
        full_env.pop(key, None)
    if env:
        full_env.update(env)

    methods: list[str] = []
    if identity is not None:
        cmd += ["-i", str(identity), "-o", "IdentitiesOnly=yes"]
        methods.append("publickey")
    if token is not None:
        helper = tmpdir / "askpass"
        helper.write_text(_ASKPASS_SCRIPT)
        helper.chmod(stat.S_IRWXU)
        full_env["SSH_ASKPASS"] = str(helper)
        full_env["SSH_ASKPASS_REQUIRE"] = "force"
        full_env[TOKEN_ENV] = token
        methods += ["keyboard-interactive", "password"]
    if methods:
        cmd += ["-o", "PreferredAuthentications=" + ",".join(methods)]
    cmd += list(args)
    return cmd, full_env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session/process group we created for ``proc`` (by its id)."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


def run_ssh(
    args: Sequence[str],
    *,
    token: str | None = None,
    input: bytes | None = None,
    timeout: float = 30,
    env: Mapping[str, str] | None = None,
    identity: Path | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``ssh`` non-interactively and capture stdout/stderr separately.

    ``args`` are appended after the helper's own options (destination, ``-p``,
    ``-tt``, remote command ...).  The client runs with ``-F /dev/null``, no
    host key checking, ``LogLevel=ERROR`` and ``BatchMode=no``.

    * ``token``: answered to every password / keyboard-interactive prompt by an
      ``SSH_ASKPASS`` helper (``SSH_ASKPASS_REQUIRE=force``); the token travels
      in the ``GUARITA_TEST_TOKEN`` environment variable only.  Also selects
      ``PreferredAuthentications=keyboard-interactive,password``.
    * ``identity``: ``-i identity -o IdentitiesOnly=yes`` and
      ``PreferredAuthentications=publickey`` (both combined when both given).
      A ``<identity>-cert.pub`` next to the key is offered automatically.
    * ``env``: extra variables on top of ``os.environ`` (``SSH_AUTH_SOCK`` is
      removed).
    * stdin is ``input`` (or ``/dev/null``).

    The client runs in its own session, so it has no controlling terminal and
    can never block on ``/dev/tty``.  On ``timeout`` the whole process group
    is killed and :class:`subprocess.TimeoutExpired` (with partial output) is
    raised.
    """
    with tempfile.TemporaryDirectory(prefix="guarita-ssh-") as tmp:
        cmd, full_env = _prepare_ssh(
            args, token=token, identity=identity, env=env, tmpdir=Path(tmp)
        )
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=full_env,
            start_new_session=True,
        )
        try:
            out, err = proc.communicate(input=input, timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            try:
                out, err = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                out, err = b"", b""
            raise subprocess.TimeoutExpired(cmd, timeout, output=out, stderr=err) from None
        except BaseException:
            _kill_group(proc)
            proc.wait()
            raise
        return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def _make_controlling_tty() -> None:  # runs in the child after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


class PtySsh:
    """The real ssh client under a real PTY, for interactive tests.

    The pty slave is ssh's stdin/stdout/stderr and its controlling terminal
    (own session).  Pass ``-tt`` in ``args`` to force a remote pty.  ``token``,
    ``identity`` and ``env`` work as in :func:`run_ssh`; ``TERM`` defaults to
    ``xterm`` when not set.

    :meth:`expect` searches only output that arrived after the previous match,
    so the same pattern can be expected repeatedly.
    """

    def __init__(
        self,
        args: Sequence[str],
        *,
        token: str | None = None,
        identity: Path | None = None,
        cols: int = 80,
        rows: int = 24,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.args = list(args)
        self.token = token
        self.identity = identity
        self.cols = cols
        self.rows = rows
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.master_fd: int | None = None
        self.last_match: re.Match[bytes] | None = None
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.returncode: int | None = None

    def start(self) -> PtySsh:
        """Spawn ssh on a fresh pty of ``cols`` x ``rows``."""
        if self.proc is not None:
            raise RuntimeError("already started")
        self._tmp = tempfile.TemporaryDirectory(prefix="guarita-ptyssh-")
        env = {"TERM": os.environ.get("TERM") or "xterm", **self.env}
        cmd, full_env = _prepare_ssh(
            self.args,
            token=self.token,
            identity=self.identity,
            env=env,
            tmpdir=Path(self._tmp.name),
        )
        master, slave = os.openpty()
        try:
            _set_winsize(master, self.cols, self.rows)
            self.proc = subprocess.Popen(
                cmd,
                stdin=slave,
                stdout=slave,
                stderr=slave,
                env=full_env,
                start_new_session=True,
                preexec_fn=_make_controlling_tty,
                close_fds=True,
            )
        except BaseException:
            os.close(master)
            self._tmp.cleanup()
            raise
        finally:
            os.close(slave)
        os.set_blocking(master, False)
        self.master_fd = master
        _register(self)
        return self

    # -- I/O ----------------------------------------------------------------

    def _read_some(self, timeout: float) -> bool:
        """Read whatever is available within ``timeout``; False on EOF."""
        if self._eof or self.master_fd is None:
            return False
        ready, _, _ = select.select([self.master_fd], [], [], max(0.0, timeout))
        if not ready:
            return True
        try:
            data = os.read(self.master_fd, 65536)
        except BlockingIOError:
            return True
        except OSError as exc:
            if exc.errno == errno.EIO:  # Linux: slave side closed
                self._eof = True
                return False
            raise
        if not data:
            self._eof = True
            return False
        self._buf += data
        return True

    def send(self, data: bytes) -> None:
        """Write ``data`` to the terminal (i.e. type it)."""
        if self.master_fd is None:
            raise RuntimeError("not started")
        view = memoryview(data)
        deadline = time.monotonic() + 10
        while view:
            try:
                n = os.write(self.master_fd, view)
                view = view[n:]
            except BlockingIOError:
                # Terminal input buffer full: drain output meanwhile.
                if time.monotonic() > deadline:
                    raise TimeoutError("pty write blocked for 10 s") from None
                select.select([], [self.master_fd], [], 0.05)
                self._read_some(0)

    def expect(self, pattern: bytes | re.Pattern[bytes], timeout: float = 10) -> bytes:
        """Read until ``pattern`` matches output received since the last match.

        Returns all output so far (the match is in :attr:`last_match`).  Raises
        :class:`TimeoutError` with the output tail on deadline, or ``EOFError``
        if ssh closed the terminal without a match.
        """
        regex = re.compile(pattern) if isinstance(pattern, bytes) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self._buf, self._pos)
            if m is not None:
                self.last_match = m
                self._pos = m.end()
                return bytes(self._buf)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"pattern {regex.pattern!r} not seen within {timeout}s; "
                    f"output tail: {bytes(self._buf[-2000:])!r}"
                )
            if not self._read_some(min(remaining, 0.5)):
                m = regex.search(self._buf, self._pos)
                if m is not None:
                    continue
                raise EOFError(
                    f"ssh closed the terminal before {regex.pattern!r}; "
                    f"output tail: {bytes(self._buf[-2000:])!r}"
                )

    def resize(self, cols: int, rows: int) -> None:
        """Set the pty size (TIOCSWINSZ) and send SIGWINCH to ssh."""
        if self.master_fd is None or self.proc is None:
            raise RuntimeError("not started")
        self.cols, self.rows = cols, rows
        _set_winsize(self.master_fd, cols, rows)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGWINCH)

    def output(self) -> bytes:
        """Everything read from the terminal so far."""
        return bytes(self._buf)

    def wait(self, timeout: float = 10) -> int:
        """Wait for ssh to exit, draining remaining output; returns the exit code.

        Raises :class:`TimeoutError` (process left running; call :meth:`close`).
        """
        if self.proc is None:
            raise RuntimeError("not started")
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(
                    f"ssh still running after {timeout}s; output tail: {bytes(self._buf[-2000:])!r}"
                )
            exited = self.proc.poll() is not None
            before = len(self._buf)
            more = self._read_some(0 if exited else min(remaining, 0.2))
            if not more:
                break
            if exited and len(self._buf) == before:
                break  # exited and nothing left to read
        try:
            self.returncode = self.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise TimeoutError(
                f"ssh closed its terminal but did not exit within {timeout}s"
            ) from None
        return self.returncode

    def close(self) -> None:
        """Kill ssh if still alive and release the pty."""
        try:
            if self.proc is not None:
                if self.proc.poll() is None:
                    _kill_group(self.proc)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=5)
                self.returncode = self.proc.returncode
        finally:
            if self.master_fd is not None:
                with contextlib.suppress(OSError):
                    os.close(self.master_fd)
                self.master_fd = None
            if self._tmp is not None:
                self._tmp.cleanup()
                self._tmp = None
            _unregister(self)

    def __enter__(self) -> PtySsh:
        if self.proc is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


__all__ = [
    "TOKEN_ENV",
    "PtySsh",
    "SshdStartError",
    "SshdTarget",
    "ensure_login_user",
    "free_port",
    "keygen",
    "public_key_line",
    "run_ssh",
]
