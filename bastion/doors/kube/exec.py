"""``kubectl exec`` / ``attach`` / ``port-forward`` through the gateway.

exec and attach: the gateway terminates the client's WebSocket (``v5.channel.k8s.io``,
also ``v4.channel.k8s.io``, ``v4.base64.channel.k8s.io``, ``base64.channel.k8s.io`` and
``channel.k8s.io`` for other clients), opens its own to the API server (v5, or v4 when
the server is older than 1.30) with its credentials and impersonation, and runs the two
as a ``Session`` of the shared pipeline: every stdin, stdout and stderr byte and every
resize goes through ``session.from_client`` / ``from_target`` / ``resize`` and is
recorded, TTY or not. The exit code comes back in the upstream's error-channel Status
and reaches the client unchanged.

SPDY (``POST`` + ``Upgrade: SPDY/3.1``, what kubectl older than 1.30 speaks, and what
newer ones fall back to after any non-101 answer) is refused with a Status that names
the kubectl version needed, *after* the identity and policy checks, so that a refused
WebSocket and the SPDY retry report the same real reason.

port-forward (and nothing else) is relayed opaquely when policy allows it, and audited:
kubectl's ``SPDY/3.1+portforward.k8s.io`` (SPDY tunnelled in the WebSocket) and
``v4.channel.k8s.io``, whichever the API server accepts. Never recorded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import operator
import shlex
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import WSMsgType, web
from yarl import URL

from bastion.doors.kube import spdy
from bastion.doors.kube.frontdoor import (
    BEARER_PROTOCOL,
    Refused,
    _header_list,
    _short,
    forward_headers,
    impersonation,
)
from bastion.doors.kube.held import HeldStream
from bastion.doors.kube.status import parse_exit, status
from bastion.doors.kube.wsframe import send_binary
from bastion.identity import Identity
from bastion.pipeline import EarlyInput, GateRefused, admit, refused
from bastion.refusal import Refused as Refusal
from bastion.session import Session, SessionInfo
from bastion.upstreams.kube.upstream import ClusterUpstream, handshake_body
from recorder.recorder import new_session_id

if TYPE_CHECKING:
    from bastion.config import AccessRule, ClusterConfig
    from bastion.doors.kube.frontdoor import KubeFrontDoor
    from bastion.doors.kube.policy import KubeRequest

log = logging.getLogger("guarita.kube")

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
V4_BASE64 = "v4.base64.channel.k8s.io"
BASE64 = "base64.channel.k8s.io"
V1 = "channel.k8s.io"
# kubectl 1.31+'s port-forward: SPDY/3.1 inside the WebSocket (client-go tools/portforward).
SPDY_PORTFORWARD = "SPDY/3.1+portforward.k8s.io"
CLIENT_PROTOCOLS = (V5, V4, V4_BASE64, BASE64, V1)
UPSTREAM_PROTOCOLS = (V5, V4)
STDIN, STDOUT, STDERR, ERROR, RESIZE, CLOSE = 0, 1, 2, 3, 4, 255
MAX_MESSAGE = 16 * 1024 * 1024
# Output waiting for the client is sent as one frame per channel, up to this size: under
# load a 32 KiB message from the API server no longer costs a WebSocket frame and a socket
# write of its own. Also the most output held before the relay waits for the client.
MERGE_BYTES = 256 * 1024
FIRST_RESIZE_WAIT = 1.0

SPDY_MESSAGE = ("guarita: kubectl {what} through guarita needs kubectl {version} or newer: the gateway speaks "
                "WebSocket ({protocols}) and does not relay SPDY. Upgrade kubectl, or use a client that speaks "
                "WebSocket.")


PORTFORWARD_SPDY_MESSAGE = (
    "guarita: kubectl port-forward through guarita needs kubectl 1.31 or newer, and a cluster at Kubernetes 1.31 "
    "or newer: the gateway relays port-forward over WebSocket ({spdy}, {v4}) and does not relay a plain SPDY "
    "upgrade. Upgrade kubectl, or use a client that speaks WebSocket.")


def _spdy_message(kind: str) -> str:
    if kind == "portforward":
        return PORTFORWARD_SPDY_MESSAGE.format(spdy=SPDY_PORTFORWARD, v4=V4)
    return SPDY_MESSAGE.format(what=kind, version="1.30", protocols=f"{V5}, {V4}")


def _is_spdy(request: web.Request) -> bool:
    return "spdy" in request.headers.get("Upgrade", "").lower()


def _is_websocket(request: web.Request) -> bool:
    return request.method == "GET" and "websocket" in request.headers.get("Upgrade", "").lower()


def _offered(request: web.Request) -> list[str]:
    return [p for p in _header_list(request.headers, "Sec-WebSocket-Protocol") if not p.startswith(BEARER_PROTOCOL)]


def _flag(values: list[str]) -> bool:
    """The API server's reading of a boolean query parameter (only the first value counts)."""
    if not values:
        return False
    return values[0].lower() not in ("0", "f", "false", "n", "no")


@dataclass(frozen=True)
class StreamParams:
    command: tuple[str, ...]
    container: str | None
    stdin: bool
    stdout: bool
    stderr: bool
    tty: bool

    @classmethod
    def parse(cls, request: web.Request) -> StreamParams:
        q = request.query
        containers = q.getall("container", [])
        return cls(command=tuple(q.getall("command", [])), container=containers[0] if containers else None,
                   stdin=_flag(q.getall("stdin", [])), stdout=_flag(q.getall("stdout", [])),
                   stderr=_flag(q.getall("stderr", [])), tty=_flag(q.getall("tty", [])))

    def query(self) -> list[tuple[str, str]]:
        """Rebuilt from what was parsed, so the upstream runs exactly what is recorded."""
        out = [("command", c) for c in self.command]
        if self.container is not None:
            out.append(("container", self.container))
        out += [(name, "true") for name in ("stdin", "stdout", "stderr", "tty") if getattr(self, name)]
        return out


class Codec:
    """Frames of one channel protocol: the first byte (or digit, in base64) is the channel."""

    def __init__(self, protocol: str) -> None:
        self.protocol = protocol
        self.base64 = "base64" in protocol
        self.version = 5 if protocol.startswith("v5.") else 4 if protocol.startswith("v4.") else 1

    def encode(self, channel: int, data: bytes) -> bytes | str:
        if self.base64:
            return chr(ord("0") + channel) + base64.b64encode(data).decode()
        return bytes([channel]) + data

    def frames(self, chunks: list[tuple[int, bytes]]) -> list[list[bytes] | str]:
        """Consecutive chunks of one channel as one frame, in order. A binary frame is the
        list of its parts, joined once with its header when sent (wsframe.send_binary):
        output crosses here at hundreds of MB/s."""
        out: list[list[bytes] | str] = []
        for channel, run in itertools.groupby(chunks, key=operator.itemgetter(0)):
            data = [piece for _, piece in run]
            out.append(self.encode(channel, b"".join(data)) if self.base64 else [bytes([channel]), *data])  # type: ignore[arg-type]
        return out

    def decode(self, msg: aiohttp.WSMessage) -> tuple[int, bytes] | None:
        if msg.type == WSMsgType.BINARY:
            data: bytes = msg.data
            return (data[0], data[1:]) if data else None
        if msg.type == WSMsgType.TEXT:
            text: str = msg.data
            if not text:
                return None
            if self.base64:
                try:
                    return ord(text[0]) - ord("0"), base64.b64decode(text[1:])
                except (binascii.Error, ValueError):
                    return None
            raw = text.encode()
            return raw[0], raw[1:]
        return None


async def _send(ws: Any, frame: bytes | str | list[bytes]) -> None:
    if isinstance(frame, str):
        await ws.send_str(frame)
    else:
        await send_binary(ws, [frame] if isinstance(frame, bytes) else frame)


class UpstreamRefused(Exception):
    def __init__(self, code: int, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.body = body


async def connect_upstream(cluster: ClusterConfig, upstream: ClusterUpstream, request: web.Request,
                           identity: Identity, req: KubeRequest, query: list[tuple[str, str]] | str,
                           protocols: tuple[str, ...]) -> aiohttp.ClientWebSocketResponse:
    """The gateway's own WebSocket to the API server (credentials + impersonation)."""
    creds = await upstream.credentials()
    headers = forward_headers(request.headers)
    for key, value in (*creds.auth_headers().items(), *impersonation(cluster, identity)):
        headers.add(key, value)
    headers["X-Forwarded-For"] = request.remote or ""
    url = URL(creds.server + req.raw_path, encoded=True)
    url = url.with_query(query) if isinstance(query, list) else URL(str(url) + (f"?{query}" if query else ""),
                                                                      encoded=True)
    holder: dict[str, bytes] = {}
    token = handshake_body.set(holder)
    assert upstream.session is not None
    limit = cluster.response_timeout
    try:
        async with asyncio.timeout(limit):
            return await upstream.session.ws_connect(
                url, protocols=protocols, headers=headers, ssl=creds.ssl, server_hostname=creds.server_hostname,
                max_msg_size=MAX_MESSAGE, compress=0, autoping=True, heartbeat=20.0)
    except aiohttp.WSServerHandshakeError as exc:
        body: dict[str, Any] | None = None
        with contextlib.suppress(ValueError, TypeError):
            parsed = json.loads(holder.get("body") or b"")
            body = parsed if isinstance(parsed, dict) else None
        message = (body or {}).get("message") or f"the API server answered HTTP {exc.status} ({exc.message})"
        raise UpstreamRefused(exc.status if exc.status >= 400 else 502, str(message), body) from None
    except TimeoutError:
        raise UpstreamRefused(504, f"guarita: the API server of cluster {cluster.name!r} did not answer within "
                                   f"{limit:g}s") from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamRefused(502, f"guarita: cannot reach the API server of cluster {cluster.name!r}: "
                                   f"{_short(exc)}") from None
    finally:
        handshake_body.reset(token)


# ---------------------------------------------------------------------------------------
# exec and attach
# ---------------------------------------------------------------------------------------


async def handle_exec(door: KubeFrontDoor, request: web.Request, identity: Identity, req: KubeRequest,
                      cluster: ClusterConfig, upstream: ClusterUpstream, source: str,
                      rule: AccessRule | None = None) -> web.StreamResponse:
    kind = req.subresource or "exec"
    if _is_spdy(request) or (request.method == "POST" and not _is_websocket(request)):
        refused(door.gw, Refusal("spdy", _spdy_message(kind), 400), "kube", subject=identity.subject,
                source=source, target=cluster.name, cluster=cluster.name, namespace=req.namespace, pod=req.name,
                kind=kind, user_agent=request.headers.get("User-Agent"))
        raise Refused(400, _spdy_message(kind))
    if not _is_websocket(request):
        raise Refused(400, f"guarita: {kind} needs a WebSocket upgrade ({', '.join(CLIENT_PROTOCOLS)})")
    offered = _offered(request)
    protocol = next((p for p in CLIENT_PROTOCOLS if p in offered), None)
    if protocol is None:
        raise Refused(400, f"guarita: none of the offered WebSocket protocols ({', '.join(offered) or 'none'}) is "
                           f"supported; use {', '.join(CLIENT_PROTOCOLS)} (kubectl 1.30 or newer)")
    params = StreamParams.parse(request)
    if kind == "exec" and not params.command:
        raise Refused(400, "guarita: exec needs a command (query parameter 'command')")
    impersonation(cluster, identity)  # refuse before the upgrade if the identity cannot be impersonated
    stream = KubeStream(door, request, identity, req, cluster, upstream, source, kind, params, protocol, rule)
    return await stream.run()


class KubeStream:
    """One exec or attach: the client's WebSocket, the upstream's, and the Session between.
    Also the session's ClientSide (bastion/pipeline.py): write_client, deliver_output,
    notify_user, terminate."""

    def __init__(self, door: KubeFrontDoor, request: web.Request, identity: Identity, req: KubeRequest,
                 cluster: ClusterConfig, upstream: ClusterUpstream, source: str, kind: str,
                 params: StreamParams, protocol: str, rule: AccessRule | None = None) -> None:
        self.door = door
        self.gw = door.gw
        self.request = request
        self.identity = identity
        self.req = req
        self.cluster = cluster
        self.upstream = upstream
        self.source = source
        self.kind = kind
        self.params = params
        self.rule = rule
        self.codec = Codec(protocol)
        self.up_codec = Codec(V5)
        self.client: web.WebSocketResponse | None = None
        self.up: aiohttp.ClientWebSocketResponse | None = None
        self.session: Session | None = None
        self.exit_code: int | None = None
        self.final: dict[str, Any] | None = None
        # Client frames read before the upstream is open (the first resize, input during an
        # approval wait: Ctrl-C on a terminal cancels the wait), replayed once it is.
        self._early: EarlyInput[tuple[int, bytes]] = EarlyInput(MAX_MESSAGE, ctrl_c_cancels=params.tty)
        self._closing = False
        self._end_reason: str | None = None
        self._send_lock = asyncio.Lock()
        self._outbox: list[tuple[int, bytes]] = []
        self._outbox_bytes = 0
        self._drainer: asyncio.Task[None] | None = None

    # -- the whole life of the stream ------------------------------------------------------

    async def run(self) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(self.codec.protocol,), max_msg_size=MAX_MESSAGE, compress=False,
                                   autoping=True)
        await ws.prepare(self.request)
        self.client = ws
        try:
            size = await self._first_size() if self.params.tty else None
            # Admission (bastion/pipeline.py: draining, the recording spool, locks and limits):
            # refused with a Status after the upgrade, so kubectl shows the reason instead of
            # retrying with SPDY.
            try:
                admission = await admit(self.gw, self._info(size), self, self._early)
            except Refusal as exc:
                await self._client_status(status(exc.status, f"guarita: {exc.message}", _status_reason(exc.status)))
                return ws
            self.session = admission.open()
            await self._run_session(admission)
        except asyncio.CancelledError:  # the client went away (aiohttp cancels the handler)
            self._end_reason = self._end_reason or "client disconnected"
            raise
        except Exception:  # after the upgrade the only way to tell kubectl is a Status
            log.exception("kube %s on %s/%s/%s failed", self.kind, self.cluster.name, self.req.namespace,
                          self.req.name)
            self._end_reason = "internal error in the gateway"
            await self._client_status(status(500, "guarita: internal error (the gateway's log has the details)",
                                             "InternalError"))
        finally:
            with contextlib.suppress(Exception):
                await ws.close()
            if self.up is not None:
                with contextlib.suppress(Exception):
                    await self.up.close()
            if self.session is not None:
                # Shielded: a cancelled handler (client gone) must still seal the recording.
                end = asyncio.ensure_future(self.session.end(self.exit_code, reason=self._end_reason))
                self.door.tasks.add(end)
                end.add_done_callback(self.door.tasks.discard)
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.shield(end)
        return ws

    def _info(self, size: tuple[int, int] | None) -> SessionInfo:
        p = self.params
        return SessionInfo(
            front_door="kube", identity=self.identity, source=self.source, target=self.cluster.name,
            kind=self.kind, command=shlex.join(p.command) if p.command else None, size=size,
            session_id=new_session_id(), rule=self.rule,
            extra={"cluster": self.cluster.name, "namespace": self.req.namespace, "pod": self.req.name,
                   "container": p.container, "argv": list(p.command), "stdin": p.stdin,
                   "kube_user": self.cluster.user_prefix + self.identity.subject,
                   "kube_protocol": self.codec.protocol})

    async def _first_size(self) -> tuple[int, int]:
        """kubectl sends the terminal size right after the upgrade: wait a moment for it, so
        the recording starts with the real size (frames read meanwhile are replayed)."""
        assert self.client is not None
        deadline = time.monotonic() + FIRST_RESIZE_WAIT
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                msg = await self.client.receive(timeout=remaining)
            except TimeoutError:
                break
            frame = self.codec.decode(msg)
            if frame is None:
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                    break
                continue
            self._early.add(frame, None)
            if frame[0] == RESIZE and (size := _parse_size(frame[1])):
                return size
        return 80, 24

    async def _run_session(self, admission: Any) -> None:
        assert self.session is not None and self.client is not None
        # APPROVAL GATE: the single awaited call where the command is submitted to the
        # approval rules, after the WebSocket upgrade and before the upstream exec opens.
        denial = await self.approval_gate(admission)
        if denial is not None:
            self._end_reason = denial
            await self._client_status(status(403, denial, "Forbidden"))
            return
        try:
            self.up = await connect_upstream(self.cluster, self.upstream, self.request, self.identity, self.req,
                                             self.params.query(), UPSTREAM_PROTOCOLS)
        except (UpstreamRefused, Refused) as exc:
            code = exc.code
            body = getattr(exc, "body", None) or status(code, str(exc))
            self._end_reason = str(body.get("message") or exc)
            self.session.marker("upstream-refused", code=code, message=self._end_reason)
            self.gw.audit.emit("kube.upstream_refused", session=self.session.id, cluster=self.cluster.name,
                               code=code, detail=self._end_reason)
            await self._client_status(body)
            return
        self.up_codec = Codec(self.up.protocol or V4)
        self.session.marker("upstream", protocol=self.up_codec.protocol)
        # The approvals' interactive gate releases held input to the target.
        self.session.attach_target(lambda data: self._write_soon(self.up, self.up_codec, STDIN, data))
        for channel, data in self._early.take():
            await self._from_client(channel, data)
        to_up = asyncio.create_task(self._client_to_upstream())
        to_client = asyncio.create_task(self._upstream_to_client())
        try:
            done, _ = await asyncio.wait({to_up, to_client}, return_when=asyncio.FIRST_COMPLETED)
            if to_client in done:
                await to_client  # re-raise its errors
                if self.final is None and not self._closing:
                    message = "guarita: the API server ended the stream without an exit status"
                    self._end_reason = message
                    await self._client_status(status(502, message, "InternalError"))
            elif not self._closing:
                self._end_reason = "client disconnected"
        finally:
            for task in (to_up, to_client):
                task.cancel()
            await asyncio.gather(to_up, to_client, return_exceptions=True)

    async def approval_gate(self, admission: Any) -> str | None:
        """APPROVAL GATE. ``None`` lets the command run; a string refuses it with that message.

        ``exec`` is matched on the exact argv (``self.params.command``), ``attach`` as the
        opening of an interactive session; typed commands of ``-it`` sessions go through the
        approvals' interactive gate in ``session.from_client``. While a request waits, the
        session's messages reach the user on stdout and client frames are kept for later
        (Ctrl-C on a terminal, or the client going away, cancels the request); the refusal
        returned here reaches kubectl as a Failure Status on the error channel.
        """
        argv = list(self.params.command)
        if not admission.gates_opening(argv):
            return None
        watcher = asyncio.create_task(self._hold_client_frames())
        try:
            await admission.decide_opening(argv)
        except GateRefused as exc:
            return exc.message
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
        return None

    async def _hold_client_frames(self) -> None:
        """While an approval waits: keep the client's frames, watch for Ctrl-C and hang-ups."""
        assert self.client is not None and self.session is not None
        async for msg in self.client:
            frame = self.codec.decode(msg)
            if frame is None:
                continue
            self._early.add(frame, frame[1] if frame[0] == STDIN else None)
        self.session.cancel_approval("client disconnected")

    def write_client(self, data: bytes) -> None:
        """guarita's own words (approval waits, the interactive gate): on stdout."""
        self._write_soon(self.client, self.codec, STDOUT, data)

    def deliver_output(self, data: bytes, stream: str) -> None:
        """Output the pipeline released late (a masker's held-back tail), in order with the rest."""
        if self.client is not None and data:
            self._queue_output(STDOUT if stream == "o" else STDERR, data)

    async def _drain_outbox(self) -> None:
        # Frames are queued in the order the pipeline produced them; whoever drains sends them in
        # that order, so a late-released tail never overtakes later output.
        async with self._send_lock:
            while self._outbox:
                chunks, self._outbox, self._outbox_bytes = self._outbox, [], 0
                for frame in self.codec.frames(chunks):
                    with contextlib.suppress(ConnectionError, RuntimeError):
                        await _send(self.client, frame)

    def _queue_output(self, channel: int, data: bytes) -> None:
        """Queue output for the client; a drainer task sends it, merging what piles up meanwhile."""
        self._outbox.append((channel, data))
        self._outbox_bytes += len(data)
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain_outbox())
            self.door.tasks.add(self._drainer)
            self._drainer.add_done_callback(self.door.tasks.discard)

    def _write_soon(self, ws: Any, codec: Codec, channel: int, data: bytes) -> None:
        """For the session's synchronous writers: sends in order, without blocking the caller."""
        if ws is None or not data:
            return
        frame = codec.encode(channel, data)

        async def send() -> None:
            async with self._send_lock:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await _send(ws, frame)

        self.door.spawn(send())

    # -- client -> upstream -----------------------------------------------------------------

    async def _client_to_upstream(self) -> None:
        assert self.client is not None
        async for msg in self.client:
            if msg.type == WSMsgType.ERROR:
                break
            frame = self.codec.decode(msg)
            if frame is not None:
                await self._from_client(*frame)

    async def _from_client(self, channel: int, data: bytes) -> None:
        assert self.session is not None and self.up is not None
        if channel == STDIN:
            if not self.params.stdin:
                return
            data = self.session.from_client(data)
            if data:  # the interactive approval gate may hold it
                await self.up.send_bytes(self.up_codec.encode(STDIN, data))  # type: ignore[arg-type]
        elif channel == RESIZE:
            size = _parse_size(data)
            if size is None:
                return
            self.session.resize(*size)
            await self.up.send_bytes(self.up_codec.encode(RESIZE, json.dumps(
                {"Width": size[0], "Height": size[1]}).encode()))  # type: ignore[arg-type]
        elif channel == CLOSE and self.codec.version == 5 and data[:1] == bytes([STDIN]):
            self.session.marker("stdin-closed")
            if self.up_codec.version == 5:
                await self.up.send_bytes(bytes([CLOSE, STDIN]))

    # -- upstream -> client -----------------------------------------------------------------

    async def _upstream_to_client(self) -> None:
        assert self.up is not None and self.client is not None and self.session is not None
        async for msg in self.up:
            if msg.type == WSMsgType.ERROR:
                break
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            channel, data = msg.data[0], msg.data[1:]
            if channel in (STDOUT, STDERR):
                data = self.session.from_target(data, "o" if channel == STDOUT else "e")
                if data:
                    self._queue_output(channel, data)
                if self._outbox_bytes >= MERGE_BYTES or self.session.recording.congested:
                    await self._hold_upstream()
            elif channel == ERROR:
                self.session.flush_output()  # held-back output goes before the exit status
                await self._drain_outbox()
                await self._upstream_status(data)
            # A CLOSE (v5) from the server, for stdout or stderr, is not passed on: kubectl knows
            # that signal only from client to server, and prints "Unknown stream id 255" for it.
            # The streams end with the error channel's Status, after all their output (above).
        await self._drain_outbox()

    async def _hold_upstream(self) -> None:
        """Stop reading the API server while the client or the recorder is slower."""
        assert self.session is not None
        self.session.hold_target(True)
        try:
            if self._outbox_bytes >= MERGE_BYTES:
                await self._drain_outbox()
            if self.session.recording.congested:
                await self.session.recording.drained()
        finally:
            self.session.hold_target(False)

    async def _upstream_status(self, data: bytes) -> None:
        assert self.session is not None
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            body = status(500, data.decode("utf-8", "replace") or "error", "InternalError")
        self.final = body
        self.exit_code, failure = parse_exit(body)
        if failure is not None:
            self._end_reason = failure
        await self._client_status(body)

    async def _client_status(self, body: dict[str, Any]) -> None:
        """The final Status, in the client's protocol (a plain message for channel.k8s.io v1)."""
        assert self.client is not None
        if self.codec.version >= 4:
            frame = self.codec.encode(ERROR, json.dumps(body).encode())
        elif body.get("status") == "Success":
            return
        else:
            frame = self.codec.encode(ERROR, str(body.get("message") or "error").encode())
        await self._drain_outbox()  # the status comes after all output
        with contextlib.suppress(ConnectionError, RuntimeError):
            await _send(self.client, frame)

    # -- ended by the gateway ---------------------------------------------------------------

    def terminate(self, message: str) -> None:
        """End the session from the gateway's side (lock, shutdown, recording failure)."""
        if self._closing:
            return
        self._closing = True
        self._end_reason = message
        if self.session is not None:
            self.session.marker("terminated", reason=message)
        self.door.spawn(self._terminate(message))

    def notify_user(self, text: str) -> None:
        """A line from guarita to the user (stderr, or the terminal), while the session goes on."""
        channel = STDERR if self.params.stderr and not self.params.tty else STDOUT
        eol = "\r\n" if self.params.tty else "\n"
        self._write_soon(self.client, self.codec, channel, f"{eol}guarita: {text}{eol}".encode())

    async def _terminate(self, message: str) -> None:
        await self._client_status(status(500, f"guarita: {message}", "InternalError"))
        if self.up is not None:
            with contextlib.suppress(Exception):
                await self.up.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()


def _status_reason(code: int) -> str:
    return {403: "Forbidden", 429: "TooManyRequests", 503: "ServiceUnavailable"}.get(code, "InternalError")


def _parse_size(data: bytes) -> tuple[int, int] | None:
    try:
        body = json.loads(data)
        width, height = int(body["Width"]), int(body["Height"])
    except (ValueError, KeyError, TypeError):
        return None
    if not (0 < width < 10000 and 0 < height < 10000):
        return None
    return width, height


# ---------------------------------------------------------------------------------------
# port-forward
# ---------------------------------------------------------------------------------------


async def handle_portforward(door: KubeFrontDoor, request: web.Request, identity: Identity, req: KubeRequest,
                             cluster: ClusterConfig, upstream: ClusterUpstream, source: str,
                             rule: AccessRule | None = None) -> web.StreamResponse:
    if not _is_websocket(request):
        raise Refused(400, _spdy_message("portforward"))
    offered = tuple(_offered(request))
    if not offered:
        raise Refused(400, f"guarita: port-forward needs a WebSocket subprotocol ({SPDY_PORTFORWARD} or {V4})")
    try:
        up = await connect_upstream(cluster, upstream, request, identity, req, request.raw_path.partition("?")[2],
                                    offered)
    except UpstreamRefused as exc:
        raise Refused(exc.code, str(exc), (exc.body or {}).get("reason")) from None
    if up.protocol not in offered:  # the client would fail on it without saying why
        await up.close()
        raise Refused(502, f"guarita: the API server of cluster {cluster.name!r} accepted none of the port-forward "
                           f"protocols offered ({', '.join(offered)}); kubectl port-forward over WebSocket needs "
                           f"Kubernetes 1.31 or newer")
    relay = PortForwardRelay(door, request, identity, req, cluster, source, up, rule)
    return await relay.run()


class PortForwardRelay:
    """Opaque WebSocket relay: port-forward data is binary and never recorded, only audited.

    In kubectl's SPDY tunnel the ports are not in the URL but in the header block of each
    stream kubectl opens: the client's control frames are read as they pass (DATA is
    skipped unread) and every new port is audited (``kube.portforward.port``).

    A tunnel is held to its caller like a session (bastion/doors/kube/held.py): locks, kills,
    credential expiry and ``max_duration`` close it, with the reason as the close reason."""

    def __init__(self, door: KubeFrontDoor, request: web.Request, identity: Identity, req: KubeRequest,
                 cluster: ClusterConfig, source: str, up: aiohttp.ClientWebSocketResponse,
                 rule: AccessRule | None = None) -> None:
        self.door, self.request, self.identity, self.req = door, request, identity, req
        self.cluster, self.source, self.up = cluster, source, up
        self.client: web.WebSocketResponse | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.reason = "closed"
        self.ports: list[str] = list(request.query.getall("ports", []))
        self.connections = 0
        self.scanner = spdy.ControlScanner() if up.protocol == SPDY_PORTFORWARD else None
        self.unread = ""  # why the tunnel's control frames could no longer be read
        self.held = HeldStream(door.gw, "portforward", identity, source, cluster.name,
                               {"namespace": req.namespace, "pod": req.name}, self._stopped, rule)
        self._tasks: list[asyncio.Task[None]] = []

    def _stopped(self, message: str) -> None:
        self.reason = message
        for task in self._tasks:
            task.cancel()

    async def run(self) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(protocols=(self.up.protocol,) if self.up.protocol else (),
                                   max_msg_size=MAX_MESSAGE, compress=False, autoping=True)
        try:
            await ws.prepare(self.request)
        except BaseException:
            await self.up.close()
            raise
        self.client = ws
        audit = self.door.gw.audit
        fields = {"subject": self.identity.subject, "source": self.source, "cluster": self.cluster.name,
                  "namespace": self.req.namespace, "pod": self.req.name,
                  "ports": self.request.query.getall("ports", []), "protocol": self.up.protocol,
                  "stream": self.held.id}
        audit.emit("kube.portforward.start", **fields)
        started = time.monotonic()
        self.door.relays.add(self)
        stopped = False
        try:
            with self.held:
                a = asyncio.create_task(self._pump(ws, self.up, "in"))
                b = asyncio.create_task(self._pump(self.up, ws, "out"))
                self._tasks = [a, b]
                try:
                    await asyncio.wait({a, b}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for t in (a, b):
                        t.cancel()
                    await asyncio.gather(a, b, return_exceptions=True)
                stopped = self.held.stopping
        finally:
            self.door.relays.discard(self)
            with contextlib.suppress(Exception):
                await self.up.close()
            with contextlib.suppress(Exception):  # the reason reaches kubectl as the close reason
                await ws.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION if stopped else aiohttp.WSCloseCode.OK,
                               message=self.reason.encode()[:120] if stopped else b"")
            extra: dict[str, Any] = {"connections": self.connections} if self.scanner or self.unread else {}
            if self.unread:
                extra["unread"] = self.unread
            audit.emit("kube.portforward.end", **{**fields, "ports": self.ports}, bytes_in=self.bytes_in,
                       bytes_out=self.bytes_out, duration=round(time.monotonic() - started, 3), reason=self.reason,
                       **extra)
        return ws

    async def _pump(self, src: Any, dst: Any, direction: str) -> None:
        async for msg in src:
            if msg.type == WSMsgType.BINARY:
                n = len(msg.data)
                await send_binary(dst, [msg.data])
            elif msg.type == WSMsgType.TEXT:
                n = len(msg.data)
                await dst.send_str(msg.data)
            else:
                break
            if direction == "in":
                self.bytes_in += n
                if self.scanner is not None and msg.type == WSMsgType.BINARY:
                    self._watch(msg.data)
            else:
                self.bytes_out += n
        self.reason = "client closed" if direction == "in" else "upstream closed"

    def _watch(self, data: bytes) -> None:
        """Counts the data streams kubectl opens and audits each port the first time."""
        assert self.scanner is not None
        try:
            frames = self.scanner.feed(data)
        except spdy.SpdyError as exc:  # the API server will refuse it too; the relay goes on
            self.scanner, self.unread = None, str(exc)
            log.warning("port-forward %s: the client's SPDY stream cannot be read (%s); ports are no longer "
                        "audited for this tunnel", self.held.id, exc)
            return
        for frame in frames:
            if not isinstance(frame, spdy.SynStream) or frame.headers.get("streamtype") != ["data"]:
                continue
            self.connections += 1
            port = (frame.headers.get("port") or [""])[0]
            if port not in self.ports:
                self.ports.append(port)
                self.door.gw.audit.emit("kube.portforward.port", subject=self.identity.subject,
                                        cluster=self.cluster.name, namespace=self.req.namespace, pod=self.req.name,
                                        port=port, stream=self.held.id)

    async def close(self, reason: str) -> None:
        self.reason = reason
        with contextlib.suppress(Exception):
            await self.up.close()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.close()


# What the Kubernetes front door hands its streaming subresources to (bastion/gateway.py).
STREAMING = {"exec": handle_exec, "attach": handle_exec, "portforward": handle_portforward}
