"""Built-in demo SSH target for ``bastion serve --dev``.

A small asyncssh SSH *server* on loopback that behaves like sshd for one
purpose: running real processes (exec, interactive shell on a real PTY,
sftp) so a newcomer can try the gateway without any real server.

It is a demo, not an sshd replacement: whatever username the client logs
in as, every process runs as the OS user running the gateway, with that
user's HOME, USER and PATH. Authentication is public key only: the single
``authorized_key``, or an OpenSSH user certificate signed by ``trusted_ca``.
Port, agent and X11 forwarding are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import pwd
import signal
import struct
import termios
from collections.abc import Awaitable, Callable
from typing import cast

import asyncssh
from asyncssh.channel import SSHChannel  # not re-exported at the top level

__all__ = ["DemoTarget"]

_CHUNK = 256 * 1024
# After an interactive shell exits, background jobs may keep the PTY slave
# open so EIO never comes; like sshd we then close once the PTY stays idle.
_PTY_LINGER = 1.0
# How long stop() lets children react to SIGHUP before SIGKILL.
_STOP_GRACE = 2.0
# asyncssh's lowest (and its default) SFTP protocol version.
_SFTP_VERSION = 3

_TermSize = tuple[int, int, int, int]


class DemoTarget:
    """A loopback SSH server that runs real processes for the gateway.

    Any username is accepted, but processes always run as the OS user
    running the gateway: this is a demo target, never a real server.
    """

    def __init__(
        self,
        host_key: asyncssh.SSHKey,
        authorized_key: asyncssh.SSHKey | None = None,
        trusted_ca: asyncssh.SSHKey | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        shell: str | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self._host_key = host_key
        self._authorized_key = authorized_key
        self._trusted_ca = trusted_ca
        self._shell = shell or os.environ.get("SHELL") or "/bin/sh"
        self._acceptor: asyncssh.SSHAcceptor | None = None
        self._connections: set[asyncssh.SSHServerConnection] = set()
        self._children: set[_Child] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Bind and listen; afterwards ``port`` is the real port."""
        self._acceptor = await asyncssh.create_server(
            lambda: _Server(self),
            self.host,
            self.port,
            server_host_keys=[self._host_key],
            encoding=None,  # raw bytes end to end
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            gss_host=None,  # no GSS probing on a loopback demo
        )
        self.port = self._acceptor.get_port()

    async def stop(self) -> None:
        """Stop listening, hang up remaining children, close connections."""
        if self._acceptor is not None:
            self._acceptor.close()
            await self._acceptor.wait_closed()
            self._acceptor = None
        await self._end_sessions()
        connections = list(self._connections)
        for conn in connections:
            conn.close()
        for conn in connections:
            await conn.wait_closed()

    async def _end_sessions(self) -> None:
        # SIGHUP first so shells can clean up, then SIGKILL; a session still
        # stuck after that (a daemon holding its pipes) is cancelled.
        pending = set(self._tasks)
        for signum in (signal.SIGHUP, signal.SIGKILL):
            if not pending:
                return
            for child in list(self._children):
                child.signal(signum)
            _, pending = await asyncio.wait(pending, timeout=_STOP_GRACE)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    def _accepts_key(self, key: asyncssh.SSHKey) -> bool:
        return _same_key(key, self._authorized_key)

    def _accepts_ca(self, key: asyncssh.SSHKey) -> bool:
        return _same_key(key, self._trusted_ca)

    async def _serve(self, process: asyncssh.SSHServerProcess[bytes]) -> None:
        """asyncssh process factory: one exec or shell request."""
        session = cast(_Session, process)  # asyncssh hands back our own session
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _run(session, self._argv(session), self._child_env(session), self._children)
        finally:
            self._tasks.discard(task)

    def _argv(self, session: _Session) -> list[str]:
        command = session.command
        if command is None:
            return [self._shell, "-l"]
        return [self._shell, "-c", command]

    def _child_env(self, session: _Session) -> dict[str, str]:
        # asyncssh's server channel accepts every env request from the
        # client, so session.env is everything the client sent.
        env = dict(session.env)
        user = pwd.getpwuid(os.getuid())
        env["HOME"] = os.environ.get("HOME") or user.pw_dir
        env["USER"] = os.environ.get("USER") or user.pw_name
        env["LOGNAME"] = env["USER"]
        env["PATH"] = os.environ.get("PATH") or os.defpath
        env["SHELL"] = self._shell
        if session.term_type is not None:
            env["TERM"] = session.term_type
        return env


class _Server(asyncssh.SSHServer):
    """Per-connection policy: public-key auth only, sessions only."""

    def __init__(self, target: DemoTarget) -> None:
        self._target = target
        self._conn: asyncssh.SSHServerConnection | None = None

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self._conn = conn
        self._target._connections.add(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._conn is not None:
            self._target._connections.discard(self._conn)

    def begin_auth(self, username: str) -> bool:
        return True

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._target._accepts_key(key)

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return self._target._accepts_ca(key)

    def session_requested(self) -> _Session:
        # Returning our own session (rather than passing process_factory and
        # sftp_factory to create_server, which bypasses session_requested)
        # lets signals and window changes reach the child directly instead
        # of being queued as exceptions on stdin, while sftp still works.
        return _Session(self._target._serve)


class _Session(asyncssh.SSHServerProcess[bytes]):
    """asyncssh stream process whose out-of-band requests hit the child."""

    def __init__(
        self, serve: Callable[[asyncssh.SSHServerProcess[bytes]], Awaitable[None]]
    ) -> None:
        # (process_factory, sftp_factory, sftp_version, allow_scp): what
        # create_server would pass itself had we given it process_factory.
        super().__init__(serve, _sftp_server, _SFTP_VERSION, False)
        self._child: _Child | None = None
        self._early: list[Callable[[_Child], None]] = []

    def attach(self, child: _Child) -> None:
        # A client may send signal/window-change right after exec, before
        # the child exists: replay those now.
        self._child = child
        for action in self._early:
            action(child)
        self._early.clear()

    def _deliver(self, action: Callable[[_Child], None]) -> None:
        if self._child is None:
            self._early.append(action)
        else:
            action(self._child)

    def signal_received(self, signame: str) -> None:
        signum = _signal_number(signame)
        if signum is not None:
            self._deliver(lambda child: child.signal(signum))

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        self._deliver(lambda child: child.resize((width, height, pixwidth, pixheight)))

    def break_received(self, msec: int) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        # Client went away while the child runs: hang it up like sshd.
        self._deliver(lambda child: child.signal(signal.SIGHUP))


def _sftp_server(chan: SSHChannel[bytes]) -> asyncssh.SFTPServer:
    # Plain SFTPServer: the whole filesystem, as the gateway's OS user.
    return asyncssh.SFTPServer(cast(asyncssh.SSHServerChannel[bytes], chan))


def _signal_number(name: str) -> signal.Signals | None:
    """Map an SSH signal name ("TERM") to a signal; None if unknown."""
    return signal.Signals.__members__.get(f"SIG{name}")


def _same_key(key: asyncssh.SSHKey, expected: asyncssh.SSHKey | None) -> bool:
    return expected is not None and key.public_data == expected.public_data


class _Child:
    """A spawned process plus the gateway's ends of its PTY or pipes."""

    def __init__(
        self,
        proc: asyncio.subprocess.Process,
        stdin_fd: int,
        outputs: list[tuple[int, bool]],
        master: int | None,
    ) -> None:
        self.proc = proc
        self.stdin_fd = stdin_fd
        self.outputs = outputs  # (fd, is_stderr)
        self.master = master
        self._open = {stdin_fd, *(fd for fd, _ in outputs)}

    def signal(self, signum: int) -> None:
        if self.proc.returncode is not None:
            return  # reaped: the pid may belong to someone else now
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)

    def resize(self, size: _TermSize) -> None:
        if self.master is not None:
            _set_winsize(self.master, size)  # the kernel SIGWINCHes the foreground group

    def close(self, fd: int) -> None:
        if fd in self._open:
            self._open.discard(fd)
            os.close(fd)

    def close_all(self) -> None:
        for fd in list(self._open):
            self.close(fd)


async def _spawn(argv: list[str], env: dict[str, str], size: _TermSize | None) -> _Child:
    """Start argv on a fresh PTY (size given) or on three separate pipes."""
    home = env["HOME"]
    cwd = home if os.path.isdir(home) else None
    if size is not None:
        master, slave = os.openpty()
        _set_winsize(master, size)
        parent_fds, child_fds = [master], [slave, slave, slave]
        preexec: Callable[[], None] | None = _take_controlling_tty
    else:
        in_r, in_w = os.pipe()
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        parent_fds, child_fds = [in_w, out_r, err_r], [in_r, out_w, err_w]
        preexec = None
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=child_fds[0],
            stdout=child_fds[1],
            stderr=child_fds[2],
            env=env,
            cwd=cwd,
            start_new_session=True,  # own session and process group
            preexec_fn=preexec,
        )
    except BaseException:
        for fd in parent_fds:
            os.close(fd)
        raise
    finally:
        # The child holds its ends now; ours must go or EOF/EIO never comes.
        for fd in set(child_fds):
            os.close(fd)
    for fd in parent_fds:
        os.set_blocking(fd, False)
    if size is not None:
        return _Child(proc, master, [(master, False)], master)
    return _Child(proc, in_w, [(out_r, False), (err_r, True)], None)


def _take_controlling_tty() -> None:
    # Runs in the child after setsid(): make the PTY on fd 0 its ctty so
    # job control, ^C and SIGWINCH work.
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _set_winsize(fd: int, size: _TermSize) -> None:
    width, height, pixwidth, pixheight = (min(max(v, 0), 0xFFFF) for v in size)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", height, width, pixwidth, pixheight))


async def _run(session: _Session, argv: list[str], env: dict[str, str], live: set[_Child]) -> None:
    """Run one child for a session and report how it ended."""
    size = session.term_size if session.term_type is not None else None
    try:
        child = await _spawn(argv, env, size)
    except OSError as exc:
        _write_quietly(session.stderr, f"demotarget: cannot run {argv[0]}: {exc.strerror}\r\n")
        session.exit(127)
        return
    live.add(child)
    session.attach(child)
    try:
        returncode = await _pipe_child(session, child)
    finally:
        live.discard(child)
        if child.proc.returncode is None:  # cancelled (stop()): leave no orphan
            child.signal(signal.SIGKILL)
            await child.proc.wait()
        child.close_all()
    _report_exit(session, returncode)


async def _pipe_child(session: _Session, child: _Child) -> int:
    """Move bytes both ways until the child exits and its output is drained."""
    pumps = [_Pump(fd, session.stderr if err else session.stdout) for fd, err in child.outputs]
    tasks = [asyncio.create_task(pump.run()) for pump in pumps]
    feeder = asyncio.create_task(_feed(session.stdin, child))
    try:
        returncode = await child.proc.wait()
        if child.master is None:
            await asyncio.gather(*tasks)  # pipes: wait for EOF, as sshd does
        else:
            await _drain_pty(tasks[0], pumps[0])
        return returncode
    finally:
        # Await the cancelled tasks so their fds leave the selector before
        # close_all() closes them.
        for task in (*tasks, feeder):
            task.cancel()
        await asyncio.gather(*tasks, feeder, return_exceptions=True)


async def _drain_pty(task: asyncio.Task[None], pump: _Pump) -> None:
    # Normally the master reads EIO right after the last output; stop early
    # only when the PTY has been idle for a while (background jobs).
    while not task.done():
        await asyncio.wait({task}, timeout=_PTY_LINGER)
        if pump.idle_for() >= _PTY_LINGER:
            task.cancel()  # the caller awaits it


class _Pump:
    """Copy one child fd to one SSH stream until EOF (pipe) or EIO (PTY)."""

    def __init__(self, fd: int, writer: asyncssh.SSHWriter[bytes]) -> None:
        self._fd = fd
        self._writer = writer
        self._idle_since: float | None = None
        self._lost = False

    def idle_for(self) -> float:
        if self._idle_since is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._idle_since

    async def run(self) -> None:
        while data := await self._read():
            await self._send(data)

    async def _read(self) -> bytes:
        while True:
            try:
                return os.read(self._fd, _CHUNK)
            except BlockingIOError:
                self._idle_since = asyncio.get_running_loop().time()
                await _wait_fd(self._fd)
                self._idle_since = None
            except OSError as exc:
                # Linux PTY master: EIO once every slave fd is closed and
                # all buffered output has been read. That is our EOF.
                if exc.errno == errno.EIO:
                    return b""
                raise

    async def _send(self, data: bytes) -> None:
        if self._lost:
            return  # keep draining so the child never blocks on a full pipe
        try:
            self._writer.write(data)
            await self._writer.drain()  # flow control: blocks while the channel is full
        except (OSError, asyncssh.Error):
            self._lost = True


async def _feed(reader: asyncssh.SSHReader[bytes], child: _Child) -> None:
    """Copy client stdin to the child; on EOF close its stdin pipe."""
    accepting = True
    while data := await _read_client(reader):
        if accepting:
            accepting = await _write_all(child.stdin_fd, data)
    if child.master is None:
        child.close(child.stdin_fd)
    # On a PTY EOF needs no action: the client sends ^D itself if it wants.


async def _read_client(reader: asyncssh.SSHReader[bytes]) -> bytes:
    try:
        return await reader.read(_CHUNK)
    except (OSError, asyncssh.Error):
        return b""  # channel gone: same as EOF


async def _write_all(fd: int, data: bytes) -> bool:
    """Write everything; False once the child stops reading for good."""
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:
            await _wait_fd(fd, write=True)
        except OSError:  # EPIPE or EIO: the reading end is gone
            return False
    return True


async def _wait_fd(fd: int, *, write: bool = False) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        # The callback can fire again before the awaiting task resumes.
        if not ready.done():
            ready.set_result(None)

    if write:
        loop.add_writer(fd, wake)
    else:
        loop.add_reader(fd, wake)
    try:
        await ready
    finally:
        if write:
            loop.remove_writer(fd)
        else:
            loop.remove_reader(fd)


def _report_exit(session: _Session, returncode: int) -> None:
    # EOF first, then exit-status/exit-signal and close, in sshd's order.
    with contextlib.suppress(OSError):
        session.stdout.write_eof()
    if returncode >= 0:
        session.exit(returncode)
        return
    try:
        name = signal.Signals(-returncode).name.removeprefix("SIG")
    except ValueError:  # e.g. real-time signals have no name
        session.exit(128 - returncode)
        return
    session.exit_with_signal(name)


def _write_quietly(writer: asyncssh.SSHWriter[bytes], text: str) -> None:
    with contextlib.suppress(OSError):
        writer.write(text.encode())
