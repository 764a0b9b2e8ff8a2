"""The SSH front door: ``ssh -p 2222 [LOGIN@]TARGET@bastion CMD``.

One ``FrontDoorServer`` per client connection proves who the agent is (an OIDC token as
password or keyboard-interactive answer, or a certificate from guarita's user CA). One
``AgentChannel`` per session channel checks policy, opens the gateway's own connection
to the target (``TargetChannel`` on the other side) and relays bytes through the shared
session pipeline, with flow control in both directions. No policy lives here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import asyncssh

from bastion.config import env_allowed
from bastion.doors.ssh.authlimit import MAX_AUTH_TRIES, AuthThrottle, claimed_subject
from bastion.doors.ssh.transfer import transfer_kind
from bastion.identity import AuthError, Identity
from bastion.identity.delegation import chain_fields
from bastion.masking.recorded import shown_command
from bastion.pipeline import Admission, EarlyInput, GateRefused, admit, refused
from bastion.policy import authorize, reachable_targets
from bastion.refusal import Refused
from bastion.session import Session, SessionInfo
from bastion.upstreams.ssh.upstream import PREFERRED_CIPHERS, TargetError, connect_target
from recorder.recorder import new_session_id

if TYPE_CHECKING:
    from bastion.services import Services

log = logging.getLogger("guarita.ssh")

EXIT_GATEWAY_ERROR = 255  # what OpenSSH itself exits with on a connection error
EXIT_REFUSED = 1  # a command (or shell) refused by approval rules, denied, timed out or cancelled
EARLY_INPUT_LIMIT = 1024 * 1024  # stdin kept while a command waits for approval, before pausing
AUTH_BANNER = ("guarita: the credential was not accepted. Use a fresh OIDC token as the password, "
               "or a certificate from `bastion ssh-cert`.\r\n")


def parse_username(username: str) -> tuple[str | None, str]:
    """``deploy@web-1`` -> ("deploy", "web-1"); ``web-1`` -> (None, "web-1")."""
    login, sep, target = username.rpartition("@")
    return (login if sep and login else None), target


class FrontDoorServer(asyncssh.SSHServer):
    def __init__(self, gateway: Services, throttle: AuthThrottle | None = None) -> None:
        self.gw = gateway
        self.identity: Identity | None = None
        self.conn: asyncssh.SSHServerConnection | None = None
        self.source = "?"
        self._cert: Any = None
        self._banner_sent = False
        # Credential guessing (bastion/doors/ssh/authlimit.py): failed attempts on this connection.
        self.throttle = throttle or AuthThrottle()
        self._address = "?"
        self._failures = 0
        self._throttled = False

    # -- connection ------------------------------------------------------------------

    def connection_made(self, conn: asyncssh.SSHServerConnection) -> None:
        self.conn = conn
        peer = conn.get_extra_info("peername") or ("?", 0)
        self.source = f"{peer[0]}:{peer[1]}"
        self._address = str(peer[0])
        self._capture_certificates(conn)
        self._audit_forwarding_requests(conn)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.identity is None and not self._throttled:
            # Gone before authenticating: a scanner, garbage instead of SSH, or a client giving up.
            why = str(exc) if exc is not None else "the client closed the connection"
            self.gw.audit.emit("auth.abandoned", source=self.source, failures=self._failures,
                               reason=why[:300] or type(exc).__name__)

    def _audit_forwarding_requests(self, conn: asyncssh.SSHServerConnection) -> None:
        # Agent and X11 forwarding are off (SshFrontDoor.start); asyncssh refuses them without a
        # callback, so the two methods it asks are wrapped to audit each refusal.
        agent = conn.create_agent_listener
        x11 = conn.attach_x11_listener

        async def refuse_agent() -> bool:
            self._refused("agent-forwarding", "ssh-agent")
            return await agent()

        async def refuse_x11(chan: Any, auth_proto: bytes, auth_data: bytes, screen: int) -> Any:
            self._refused("x11-forwarding", f"screen {screen}")
            return await x11(chan, auth_proto, auth_data, screen)

        conn.create_agent_listener = refuse_agent  # type: ignore[method-assign]
        conn.attach_x11_listener = refuse_x11  # type: ignore[method-assign]

    def _capture_certificates(self, conn: asyncssh.SSHServerConnection) -> None:
        # asyncssh checks a certificate's CA, validity and signature, but hands its callbacks
        # only the CA key; the identity lives in the certificate's key id. Wrapping this
        # (private, version-pinned in pyproject.toml) method is the one place we see the
        # validated certificate. tests/test_ssh_cert.py fails loudly if asyncssh changes it.
        original = conn._validate_openssh_certificate  # type: ignore[attr-defined]

        async def capture(username: str, cert: Any) -> Any:
            key = await original(username, cert)
            if key is not None:
                self._cert = cert
            return key

        conn._validate_openssh_certificate = capture  # type: ignore[attr-defined,method-assign]

    def begin_auth(self, username: str) -> bool:
        banner = self.gw.config.ssh_banner
        if banner and self.conn is not None:  # the operator's notice (e.g. "sessions are recorded")
            self.conn.send_auth_banner(banner)
        return True

    # -- token as password or keyboard-interactive answer --------------------------------

    def password_auth_supported(self) -> bool:
        return True

    async def validate_password(self, username: str, password: str) -> bool:
        return await self._accept_token(username, password, "password")

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username: str, lang: str, submethods: str) -> tuple[str, str, str, list[tuple[str, bool]]]:
        # No name or instructions: OpenSSH prints them even when an askpass helper answers.
        return ("", "", "", [("guarita OIDC token: ", False)])

    async def validate_kbdint_response(self, username: str, responses: Sequence[str]) -> bool:
        if len(responses) != 1:
            return False
        return await self._accept_token(username, responses[0], "keyboard-interactive")

    async def _accept_token(self, username: str, token: str, method: str) -> bool:
        subject = claimed_subject(token)
        refusal = self.throttle.refusal(self._address, subject)
        if refusal is not None:  # refused before the token is even verified: guessing costs little
            self._throttle(refusal[0], refusal[1], method)
            return False
        try:
            self.identity = await self.gw.verifier.verify(token.strip(), method=method)
        except AuthError as exc:
            self.throttle.failed(self._address, subject)
            self._auth_failed(username, method, exc)
            return False
        self.gw.audit.emit("auth.success", method=method, source=self.source, user=username,
                           subject=self.identity.subject, issuer=self.identity.issuer, **chain_fields(self.identity))
        return True

    def _auth_failed(self, username: str, method: str, exc: AuthError) -> None:
        self.gw.audit.emit("auth.failure", method=method, source=self.source, user=username,
                           reason=exc.reason, detail=str(exc))
        if self.conn is not None and not self._banner_sent:
            self._banner_sent = True
            self.conn.send_auth_banner(AUTH_BANNER)
        self._count_failure(method)

    def _count_failure(self, method: str) -> None:
        self._failures += 1
        if self._failures >= MAX_AUTH_TRIES:
            self._throttle("connection", f"too many authentication attempts on one connection ({MAX_AUTH_TRIES})",
                           method)

    def _throttle(self, scope: str, message: str, method: str) -> None:
        """Refuse with one clear line (a banner the client prints) and close the connection."""
        if self._throttled:
            return
        self._throttled = True
        self.gw.audit.emit("auth.throttled", scope=scope, method=method, source=self.source, detail=message,
                           failures=self._failures)
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.send_auth_banner(f"guarita: {message}\r\n")
            self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, f"guarita: {message}")

    # -- certificates from guarita's user CA -------------------------------------------------

    def public_key_auth_supported(self) -> bool:
        return True

    def validate_public_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        # Bare keys prove nothing about an OIDC identity. Each offer counts as an attempt, as
        # in OpenSSH (a client with many keys in its agent should use -o IdentitiesOnly=yes).
        self._count_failure("publickey")
        return False

    def validate_ca_key(self, username: str, key: asyncssh.SSHKey) -> bool:
        return key.public_data == self.gw.user_ca.key.public_data

    def auth_completed(self) -> None:
        if self.identity is None and self._cert is not None:
            cert = self._cert
            try:
                self.identity = self.gw.user_ca.identity_from_key_id(cert._key_id, cert._valid_before)
            except AuthError as exc:
                self._auth_failed("?", "certificate", exc)
                assert self.conn is not None
                self.conn.disconnect(asyncssh.DISC_NO_MORE_AUTH_METHODS_AVAILABLE, "certificate refused")
                return
            self.gw.audit.emit("auth.success", method="certificate", source=self.source,
                               subject=self.identity.subject, issuer=self.identity.issuer,
                               **chain_fields(self.identity))

    # -- what an authenticated agent may open ---------------------------------------------

    def session_requested(self) -> AgentChannel:
        assert self.identity is not None
        return AgentChannel(self)

    def connection_requested(self, dest_host: str, dest_port: int, orig_host: str, orig_port: int) -> bool:
        self._refused("direct-tcpip", f"{dest_host}:{dest_port}")
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "port forwarding is not allowed through guarita")

    def server_requested(self, listen_host: str, listen_port: int) -> bool:
        self._refused("tcpip-forward", f"{listen_host}:{listen_port}")
        return False

    def unix_connection_requested(self, dest_path: str) -> bool:
        self._refused("direct-streamlocal", dest_path)
        raise asyncssh.ChannelOpenError(asyncssh.OPEN_ADMINISTRATIVELY_PROHIBITED,
                                        "socket forwarding is not allowed through guarita")

    def unix_server_requested(self, listen_path: str) -> bool:
        self._refused("streamlocal-forward", listen_path)
        return False

    def _refused(self, what: str, where: str) -> None:
        self.gw.audit.emit("forward.refused", kind=what, destination=where, source=self.source,
                           subject=self.identity.subject if self.identity else None)


class AgentChannel(asyncssh.SSHServerSession):  # type: ignore[type-arg]
    """The agent-facing session channel; also the session's ClientSide (bastion/pipeline.py):
    write_client, deliver_output, notify_user, terminate."""

    def __init__(self, server: FrontDoorServer) -> None:
        self.server = server
        self.gw = server.gw
        self.chan: asyncssh.SSHServerChannel | None = None
        self.kind = "shell"
        self.command: str | None = None
        self.subsystem: str | None = None
        self.term: tuple[str, tuple[int, int, int, int], dict[int, int]] | None = None
        self.target_conn: asyncssh.SSHClientConnection | None = None
        self.target_chan: asyncssh.SSHClientChannel | None = None
        self._paused: set[str] = set()
        self._closing = False
        # Input that arrives while an approval gate holds the session (kept for the command).
        # Stdin and EOF that arrive before the target session is open (asyncssh resumes
        # reading right after session_started, whatever we asked): kept, then replayed.
        self._early: EarlyInput[bytes] | None = EarlyInput(EARLY_INPUT_LIMIT, self._pause_client)
        self._admission: Admission | None = None
        self._session_id = new_session_id()
        self._lost = False

    # -- requests before the session starts ----------------------------------------------

    def connection_made(self, chan: asyncssh.SSHServerChannel) -> None:
        self.chan = chan

    def pty_requested(self, term_type: str, term_size: tuple[int, int, int, int],
                      term_modes: Mapping[int, int]) -> bool:
        self.term = (term_type, term_size, dict(term_modes))
        return True

    def shell_requested(self) -> bool:
        self.kind = "shell"
        return True

    def exec_requested(self, command: str) -> bool:
        self.kind, self.command = "exec", command
        return True

    def subsystem_requested(self, subsystem: str) -> bool:
        # Accepted here and refused (or relayed) once policy is known, so the agent reads why.
        self.kind, self.subsystem = "subsystem", subsystem
        return True

    def session_started(self) -> None:
        assert self.chan is not None
        self.chan.pause_reading()  # nothing goes anywhere until the target is connected
        asyncio.create_task(self._open())

    # -- opening the target ----------------------------------------------------------------

    async def _open(self) -> None:
        assert self.chan is not None and self.server.identity is not None
        identity = self.server.identity
        login, target_name = parse_username(self.chan.get_extra_info("username") or "")
        fields = {"source": self.server.source, "subject": identity.subject, "target": target_name, "login": login,
                  "kind": self.kind, "command": shown_command(self.gw.config.masking, self.gw.masking_secret, "ssh",
                                                              target_name, identity.groups, self.command)}
        connecting: asyncio.Future[Any] | None = None
        try:
            target, login, rule = self._resolve(identity, login, target_name)
            info = self._session_info(identity, target.name, login, rule)
            # Admission (bastion/pipeline.py): draining, the recording spool, locks and limits,
            # before the target is contacted.
            self._admission = admission = await admit(self.gw, info, self, self._early)
            # The connection to the target is made during an approval wait, so an approved
            # command starts at once; no session is opened on it before the decision.
            connecting = asyncio.ensure_future(
                connect_target(target, login, identity, self._session_id, self.gw.target_ca))
            await admission.decide_opening()
            if self._lost or self._closing:
                raise GateRefused("cancelled", "the client went away")
            self.target_conn = await connecting
            connecting = None
        except GateRefused as exc:
            if self._admission is not None and self._admission.session is not None:
                with contextlib.suppress(OSError, asyncssh.Error):
                    self.chan.exit(EXIT_REFUSED)
                await self._admission.session.end(EXIT_REFUSED, reason=exc.message)
            return
        except Refused as exc:
            if self._admission is not None:
                self._admission.refuse(exc)
            else:
                refused(self.gw, exc, "ssh", **fields)
            if self.session is not None:  # opened by the approval gate: it ends here
                await self.session.end(EXIT_GATEWAY_ERROR, reason=exc.message)
            self._fail(exc.message)
            return
        finally:
            if connecting is not None:
                connecting.add_done_callback(_close_unused)
                connecting.cancel()
        try:
            await self._start_target_session(admission)
        except (asyncssh.Error, OSError) as exc:
            reason = getattr(exc, "reason", None) or str(exc)
            admission.refuse(Refused("target_session_failed", reason, 502))
            self._fail(f"target {target.name} refused the session: {reason}")
            return
        self._flush_early()
        self.chan.resume_reading()

    @property
    def session(self) -> Session | None:
        return self._admission.session if self._admission is not None else None

    def _session_info(self, identity: Identity, target_name: str, login: str, rule: Any) -> SessionInfo:
        return SessionInfo(front_door="ssh", identity=identity, source=self.server.source, target=target_name,
                           login=login, kind=self.kind, command=self.command, subsystem=self.subsystem,
                           term=self.term[0] if self.term else None,
                           size=(self.term[1][0], self.term[1][1]) if self.term else None,
                           session_id=self._session_id, rule=rule)

    def _pause_client(self) -> None:
        if self.chan is not None:
            self.chan.pause_reading()  # resumed once the target is open

    def _flush_early(self) -> None:
        """Stdin that arrived during the approval wait goes to the command now."""
        early, self._early = self._early, None
        if self.target_chan is None or self.session is None or early is None:
            return
        for chunk in early.take():
            self.target_chan.write(self.session.from_client(chunk))
        if early.eof:
            self._eof_to_target()

    def _resolve(self, identity: Identity, login: str | None, target_name: str) -> tuple[Any, str, Any]:
        target = self.gw.config.target(target_name)
        if target is None:
            known = reachable_targets(self.gw.config, identity)
            hint = f" (targets you may use: {', '.join(known)})" if known else ""
            raise TargetError("unknown_target", f"unknown target {target_name!r}{hint}")
        login = login or target.default_login
        if login is None:
            raise TargetError("login_required", f"target {target.name!r} has several logins: connect as "
                              f"LOGIN@{target.name}@bastion with LOGIN one of {', '.join(target.logins)}")
        decision = authorize(self.gw.config, identity, target, login)
        if not decision.allowed:
            raise TargetError("access_denied", decision.reason)
        if self.kind == "subsystem" and not (decision.rule and decision.rule.sftp and self.subsystem == "sftp"):
            raise TargetError("subsystem_denied", f"subsystem {self.subsystem!r} (sftp/scp file transfer) is not "
                              f"allowed for you on {target.name!r} by guarita policy")
        transfer = transfer_kind(self.command) if self.kind == "exec" else None
        if transfer and not (decision.rule and decision.rule.sftp):
            raise TargetError("subsystem_denied", f"file transfer by exec ({transfer}) is not allowed for you on "
                              f"{target.name!r} by guarita policy (access sftp = false)")
        return target, login, decision.rule

    async def _start_target_session(self, admission: Admission) -> None:
        assert self.chan is not None and self.target_conn is not None
        asked = self.chan.get_environment() or {}
        env = {k: v for k, v in asked.items() if env_allowed(k, self.gw.config.env_allowlist)}
        if dropped := sorted(_env_name(k) for k in asked if k not in env):  # names only, never values
            self.gw.audit.emit("env.refused", session=self._session_id, source=self.server.source,
                               subject=admission.info.identity.subject, names=dropped,
                               reason="not in ssh.env_allowlist")
        session = admission.open()  # unless the approval gate opened it already
        kwargs: dict[str, Any] = {"env": env, "encoding": None}
        if self.term:
            kwargs.update(term_type=self.term[0], term_size=self.term[1], term_modes=self.term[2])
        if self.kind == "subsystem":
            kwargs["subsystem"] = self.subsystem
        try:
            self.target_chan, _ = await self.target_conn.create_session(
                lambda: TargetChannel(self), self.command, **kwargs)
        except BaseException:
            await session.end(None, reason="target refused the session")
            raise
        # The approval gate of an interactive session releases held input to the target.
        session.attach_target(self.target_chan.write)

    def write_client(self, data: bytes) -> None:
        """guarita's own words: on stderr until the target session is open, then on the terminal."""
        if self.chan is None:
            return
        with contextlib.suppress(OSError, asyncssh.Error):
            (self.chan.write if self.target_chan is not None else self.chan.write_stderr)(data)

    def _fail(self, message: str) -> None:
        assert self.chan is not None
        self._release_slot()
        try:
            self.chan.write_stderr(f"guarita: {message}\r\n".encode())
            self.chan.exit(EXIT_GATEWAY_ERROR)
        except (OSError, asyncssh.Error):
            pass
        if self.target_conn is not None:
            self.target_conn.close()

    def terminate(self, message: str) -> None:
        """End the session from the gateway's side (lock, shutdown, recording failure)."""
        if self._closing:
            return
        self._closing = True
        if self.session is not None:
            self.session.marker("terminated", reason=message)
        self._fail(message)

    def notify_user(self, text: str) -> None:
        """A line from guarita on the agent's stderr (its terminal), while the session goes on."""
        if self.chan is not None:
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.write_stderr(f"\r\nguarita: {text}\r\n".encode())

    def _release_slot(self) -> None:
        """The session slot taken at admission, when no session will use it (bastion/control)."""
        if self._admission is not None:
            self._admission.release()

    # -- agent -> target -----------------------------------------------------------------

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if self.target_chan is None or self.session is None:
            if self._early is not None:  # target not open yet, or a command waits for approval
                self._early.add(data, data)
            return
        self.target_chan.write(self.session.from_client(data))

    def eof_received(self) -> bool:
        if self.target_chan is not None:
            self._eof_to_target()
        elif self._early is not None:
            self._early.eof = True
        return True  # keep our side open: the target still sends output and the exit status

    def _eof_to_target(self) -> None:
        assert self.target_chan is not None and self.session is not None
        chan = self.target_chan

        def eof() -> None:
            with contextlib.suppress(OSError, asyncssh.Error):
                chan.write_eof()

        self.session.after_held_input(eof)  # never ahead of an Enter the approval gate holds

    def break_received(self, msec: int) -> bool:
        if self.target_chan is not None:
            self.target_chan.send_break(msec)
        return True

    def signal_received(self, signal: str) -> None:
        if self.target_chan is not None:
            self.target_chan.send_signal(signal)
            if self.session:
                self.session.marker("signal", signal=signal)

    def terminal_size_changed(self, width: int, height: int, pixwidth: int, pixheight: int) -> None:
        if self.target_chan is not None:
            self.target_chan.change_terminal_size(width, height, pixwidth, pixheight)
        if self.session is not None:
            self.session.resize(width, height)

    def pause_writing(self) -> None:
        self._pause_target("agent")

    def resume_writing(self) -> None:
        self._resume_target("agent")

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        if self.session is None:
            self._release_slot()
        if self.target_chan is not None:
            self.target_chan.close()
        if self.target_conn is not None:
            self.target_conn.close()
        if self.session is not None and not self.session.ended:
            asyncio.create_task(self.session.end(None, reason="client disconnected"))

    # -- target -> agent -----------------------------------------------------------------

    def target_output(self, data: bytes, stderr: bool) -> None:
        assert self.chan is not None and self.session is not None
        data = self.session.from_target(data, "e" if stderr else "o")
        try:
            if stderr:
                self.chan.write_stderr(data)
            else:
                self.chan.write(data)
        except (OSError, asyncssh.Error):
            return
        if self.session.recording.congested:
            self._pause_target("recorder")
            asyncio.create_task(self._resume_when_recorded())

    async def _resume_when_recorded(self) -> None:
        assert self.session is not None
        await self.session.recording.drained()
        self._resume_target("recorder")

    def _pause_target(self, why: str) -> None:
        if not self._paused and self.target_chan is not None:
            self.target_chan.pause_reading()
            if self.session is not None:
                self.session.hold_target(True)
        self._paused.add(why)

    def _resume_target(self, why: str) -> None:
        self._paused.discard(why)
        if not self._paused and self.target_chan is not None:
            self.target_chan.resume_reading()
            if self.session is not None:
                self.session.hold_target(False)

    def deliver_output(self, data: bytes, stream: str) -> None:
        """Output the pipeline released late (a masker's held-back tail)."""
        assert self.chan is not None
        try:
            (self.chan.write_stderr if stream == "e" else self.chan.write)(data)
        except (OSError, asyncssh.Error):
            pass

    def target_closed(self, status: int | None, signal: tuple[str, bool, str, str] | None, lost: bool) -> None:
        assert self.chan is not None and self.session is not None
        self.session.flush_output()  # everything the target printed reaches the agent before the exit status
        reason = None
        try:
            if signal is not None:
                self.chan.exit_with_signal(*signal)
            elif status is not None:
                self.chan.exit(status)
            elif not self._closing:
                reason = "connection to the target was lost"
                self.chan.write_stderr(f"guarita: {reason}\r\n".encode())
                self.chan.exit(EXIT_GATEWAY_ERROR)
        except (OSError, asyncssh.Error):
            pass
        asyncio.create_task(self.session.end(status, signal[0] if signal else None, reason))
        if self.target_conn is not None:
            self.target_conn.close()


def _close_unused(future: asyncio.Future[Any]) -> None:
    """A target connection opened for a command that was then refused: close it."""
    if future.cancelled():
        return
    if future.exception() is None:
        future.result().close()


class TargetChannel(asyncssh.SSHClientSession):  # type: ignore[type-arg]
    """The gateway's session channel on the target: forwards everything to its AgentChannel."""

    def __init__(self, agent: AgentChannel) -> None:
        self.agent = agent
        self.status: int | None = None
        self.signal: tuple[str, bool, str, str] | None = None

    def data_received(self, data: bytes, datatype: int | None) -> None:
        self.agent.target_output(data, datatype == asyncssh.EXTENDED_DATA_STDERR)

    def exit_status_received(self, status: int) -> None:
        self.status = status

    def exit_signal_received(self, signal: str, core_dumped: bool, msg: str, lang: str) -> None:
        self.signal = (signal, core_dumped, msg, lang)

    def pause_writing(self) -> None:
        if self.agent.chan is not None:
            self.agent.chan.pause_reading()

    def resume_writing(self) -> None:
        if self.agent.chan is not None:
            self.agent.chan.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.agent.target_closed(self.status, self.signal, exc is not None)


def _env_name(name: str | bytes) -> str:
    return name.decode("utf-8", "replace") if isinstance(name, bytes) else name


class SshFrontDoor:
    """The SSH listener (a :class:`bastion.doors.FrontDoor`): one ``FrontDoorServer`` per connection."""

    def __init__(self, gateway: Services) -> None:
        self.gw = gateway
        self.acceptor: asyncssh.SSHAcceptor | None = None
        self.port = 0
        self.throttle = AuthThrottle()  # one per gateway: failures from one address add up across connections

    async def start(self) -> None:
        host, port = self.gw.config.ssh_listen
        self.acceptor = await asyncssh.create_server(
            lambda: FrontDoorServer(self.gw, self.throttle), host, port,
            server_host_keys=[self.gw.host_key],
            server_version="guarita",
            line_editor=False,
            agent_forwarding=False,
            x11_forwarding=False,
            allow_scp=False,
            encoding=None,
            login_timeout=60,
            keepalive_interval=30,
            # The gateway re-encrypts every byte: prefer the AES-GCM ciphers that CPUs accelerate.
            encryption_algs=PREFERRED_CIPHERS,
        )
        self.port = self.acceptor.sockets[0].getsockname()[1]

    async def stop_accepting(self) -> None:
        if self.acceptor is not None:
            self.acceptor.close()  # open connections stay (asyncssh closes the listener only)

    async def stop(self) -> None:
        # The gateway ended the sessions first; a connection without one ends with its client.
        await self.stop_accepting()
