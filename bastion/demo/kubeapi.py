"""A Kubernetes API-server stand-in: the demo cluster of ``bastion serve --dev`` and the
tests' "cluster" (no kube-apiserver installs here). It is NOT Kubernetes: its pods are
processes on this machine, run as the user who started the gateway.

HTTPS with its own test CA; serves what kubectl needs: ``/version`` (1.32), ``/api``,
``/apis``, ``/api/v1`` (an APIResourceList with pods), pods (get, list, Table output,
``?watch=1`` streaming), pod logs (``follow``), and exec/attach over WebSocket
(``v5.channel.k8s.io`` / ``v4.channel.k8s.io``) that run REAL processes, under a PTY
when ``tty=true``, with pipes otherwise. Port-forward (bastion/demo/portforward.py)
speaks what kubectl 1.31+ speaks, SPDY/3.1 tunnelled in a WebSocket
(``SPDY/3.1+portforward.k8s.io``), and the plain ``v4.channel.k8s.io`` channel
protocol, to 127.0.0.1:PORT.

Authentication: a bearer token in ``tokens`` or a client certificate from the test CA.
Every request is recorded (method, path, headers, client certificate) so tests can
assert on the ``Authorization`` and ``Impersonate-*`` headers that reached the "cluster".

Path prefixes select behaviours of other API servers: ``/v4only`` speaks only
``v4.channel.k8s.io`` (an API server older than 1.30), ``/slow`` never answers.

Runs in a thread with its own event loop; ``stop()`` kills every process it started.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import pty
import signal
import ssl
import struct
import termios
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import WSMsgType, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bastion.demo import portforward

V5 = "v5.channel.k8s.io"
V4 = "v4.channel.k8s.io"
PREFIXES = ("/v4only", "/slow")
CREATED = "2024-01-01T00:00:00Z"
NOT_KUBERNETES = "a guarita demo pod: a process on this machine, not Kubernetes"
SHELL_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
ATTACH_PROGRAMS = {
    "attach-pipe": ["sh", "-c", 'echo attached; while IFS= read -r l; do echo "echo:$l"; done; echo bye'],
}


# ---------------------------------------------------------------------------
# a test CA
# ---------------------------------------------------------------------------


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    """A CA for the stand-in's server certificate and the gateway's client certificates."""

    def __init__(self, workdir: Path, name: str = "kube stand-in CA") -> None:
        self.dir = workdir
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self.cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                     .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
                     .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .add_extension(x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                                    critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self.file = workdir / "ca.crt"
        self.file.write_bytes(self.pem)

    def issue(self, stem: str, common_name: str, server: bool) -> tuple[Path, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
                   .issuer_name(self.cert.subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        cert_path, key_path = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path.write_bytes(_pem_key(key))
        os.chmod(key_path, 0o600)
        return cert_path, key_path


# ---------------------------------------------------------------------------
# the pods
# ---------------------------------------------------------------------------


def make_pod(ns: str, name: str, containers: Iterable[str], stdin: bool = False, tty: bool = False,
             restarts: int = 0) -> dict[str, Any]:
    names = list(containers)
    return {
        "kind": "Pod", "apiVersion": "v1",
        "metadata": {"name": name, "namespace": ns, "uid": f"uid-{ns}-{name}", "resourceVersion": "1",
                     "creationTimestamp": CREATED, "labels": {"app": name},
                     "annotations": {"guarita.dev/demo": NOT_KUBERNETES}},
        "spec": {"containers": [{"name": c, "image": "busybox", "stdin": stdin, "tty": tty} for c in names]},
        "status": {"phase": "Running", "podIP": "10.0.0.1", "containerStatuses": [
            {"name": c, "ready": True, "restartCount": restarts, "image": "busybox", "imageID": "", "started": True,
             "state": {"running": {"startedAt": CREATED}}} for c in names]},
    }


def _pod_row(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod["status"]["containerStatuses"]
    ready = f"{sum(1 for s in statuses if s['ready'])}/{len(statuses)}"
    restarts = str(sum(s["restartCount"] for s in statuses))
    meta = pod["metadata"]
    return {"cells": [meta["name"], ready, pod["status"]["phase"], restarts, "1d"],
            "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                       "metadata": {k: meta[k] for k in ("name", "namespace", "uid", "resourceVersion",
                                                         "creationTimestamp")}}}


def _table(pods: list[dict[str, Any]], rv: str = "1") -> dict[str, Any]:
    columns = [("Name", "string", "name"), ("Ready", "string", ""), ("Status", "string", ""),
               ("Restarts", "string", ""), ("Age", "string", "")]
    return {"kind": "Table", "apiVersion": "meta.k8s.io/v1", "metadata": {"resourceVersion": rv},
            "columnDefinitions": [{"name": n, "type": t, "format": f, "description": n, "priority": 0}
                                  for n, t, f in columns],
            "rows": [_pod_row(p) for p in pods]}


def _wants_table(request: web.Request) -> bool:
    return "as=Table" in request.headers.get("Accept", "")


def _status(code: int, message: str, reason: str) -> web.Response:
    return web.json_response({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                              "message": message, "reason": reason, "code": code}, status=code)


API_RESOURCES = {
    "kind": "APIResourceList", "apiVersion": "v1", "groupVersion": "v1",
    "resources": [
        {"name": "pods", "singularName": "pod", "namespaced": True, "kind": "Pod", "shortNames": ["po"],
         "categories": ["all"], "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"]},
        {"name": "pods/attach", "singularName": "", "namespaced": True, "kind": "PodAttachOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/exec", "singularName": "", "namespaced": True, "kind": "PodExecOptions",
         "verbs": ["create", "get"]},
        {"name": "pods/log", "singularName": "", "namespaced": True, "kind": "Pod", "verbs": ["get"]},
        {"name": "pods/portforward", "singularName": "", "namespaced": True, "kind": "PodPortForwardOptions",
         "verbs": ["create", "get"]},
        {"name": "namespaces", "singularName": "namespace", "namespaced": False, "kind": "Namespace",
         "shortNames": ["ns"], "verbs": ["get", "list", "watch"]},
    ],
}


# ---------------------------------------------------------------------------
# what the stand-in saw
# ---------------------------------------------------------------------------


@dataclass
class Seen:
    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    client_cn: str | None = None
    at: float = field(default_factory=time.time)

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def impersonation(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for k, v in self.headers:
            if k.lower().startswith("impersonate-"):
                out.setdefault(k.lower(), []).append(v)
        return out


class KubeAPIStandIn:
    def __init__(self, workdir: Path, tokens: Iterable[str] = ("gateway-sa-token",)) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.tokens = set(tokens)
        self.seen: list[Seen] = []
        self.execs: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self.ca = TestCA(workdir)
        # Log output a test sets for "pod/container" (the stand-in runs in the test's process).
        self.log_chunks: dict[str, list[bytes]] = {}
        self.pods: dict[str, dict[str, dict[str, Any]]] = {
            "default": {
                "web": make_pod("default", "web", ["app", "sidecar"]),
                "ticker": make_pod("default", "ticker", ["app"]),
                "attach-pipe": make_pod("default", "attach-pipe", ["app"], stdin=True),
            },
            "restricted": {"db": make_pod("restricted", "db", ["postgres"])},
        }
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._procs: set[asyncio.subprocess.Process] = set()
        self._error: BaseException | None = None

    # -- lifecycle --------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> KubeAPIStandIn:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), name="kube-standin", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or self._error is not None:
            raise RuntimeError(f"kube stand-in did not start: {self._error!r}")
        return self

    def _run(self, ready: threading.Event) -> None:
        loop = self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(self._setup())
        except BaseException as exc:  # reported by start()
            self._error = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()
        loop.close()

    async def _setup(self) -> None:
        self._stopping = asyncio.Event()
        cert, key = self.ca.issue("server", "kube-standin", server=True)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert, key)
        context.load_verify_locations(cafile=str(self.ca.file))
        context.verify_mode = ssl.CERT_OPTIONAL
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    def stop(self) -> None:
        loop, self._loop = self._loop, None
        if loop is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(15)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(15)

    async def _shutdown(self) -> None:
        assert self._stopping is not None
        self._stopping.set()
        for proc in list(self._procs):
            _kill(proc)
        if self._runner is not None:
            await self._runner.cleanup()

    def __enter__(self) -> KubeAPIStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- what tests read ---------------------------------------------------------

    def requests(self, since: int = 0) -> list[Seen]:
        with self._lock:
            return list(self.seen[since:])

    def mark(self) -> int:
        with self._lock:
            return len(self.seen)

    def kubeconfig(self, path: Path, prefix: str = "", token: str | None = None, token_file: Path | None = None,
                   client_cert: tuple[Path, Path] | None = None, server: str | None = None) -> Path:
        """A kubeconfig for the *gateway's* own credentials to this stand-in."""
        user: dict[str, Any] = {}
        if token:
            user["token"] = token
        if token_file:
            user["tokenFile"] = str(token_file)
        if client_cert:
            user["client-certificate"] = str(client_cert[0])
            user["client-key"] = str(client_cert[1])
        doc = {
            "apiVersion": "v1", "kind": "Config", "current-context": "standin",
            "clusters": [{"name": "standin", "cluster": {
                "server": (server or self.url) + prefix,
                "certificate-authority-data": base64.b64encode(self.ca.pem).decode()}}],
            "users": [{"name": "gateway", "user": user}],
            "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "gateway"}}],
        }
        path.write_text(json.dumps(doc))  # JSON is YAML
        return path

    # -- requests ------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        peer = request.transport.get_extra_info("peercert") if request.transport else None
        cn = None
        if peer:
            for rdn in peer.get("subject", ()):
                for key, value in rdn:
                    if key == "commonName":
                        cn = value
        path = request.path
        with self._lock:
            self.seen.append(Seen(request.method, path, request.query_string, list(request.headers.items()), cn))
        mode = ""
        for prefix in PREFIXES:
            if path == prefix or path.startswith(prefix + "/"):
                mode, path = prefix[1:], path[len(prefix):] or "/"
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if not (cn or (scheme.lower() == "bearer" and token in self.tokens)):
            return _status(401, "Unauthorized", "Unauthorized")
        if mode == "slow":
            assert self._stopping is not None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 60)
            return _status(503, "too slow", "ServiceUnavailable")
        try:
            return await self._route(request, path, mode)
        except web.HTTPException:
            raise

    async def _route(self, request: web.Request, path: str, mode: str) -> web.StreamResponse:
        parts = [p for p in path.split("/") if p]
        if path == "/version":
            minor = "29" if mode == "v4only" else "32"
            return web.json_response({"major": "1", "minor": minor, "gitVersion": f"v1.{minor}.0",
                                      "gitCommit": "guarita-demo-not-kubernetes", "gitTreeState": "clean", "buildDate": CREATED,
                                      "goVersion": "go1.23", "compiler": "gc", "platform": "linux/amd64"})
        if path == "/api":
            return web.json_response({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{self.port}"}]})
        if path == "/apis":
            return web.json_response({"kind": "APIGroupList", "apiVersion": "v1", "groups": []})
        if path == "/api/v1":
            return web.json_response(API_RESOURCES)
        if parts[:2] != ["api", "v1"]:
            return _status(404, f"the server could not find the requested resource ({path})", "NotFound")
        rest = parts[2:]
        if rest == ["pods"]:
            return await self._list(request, None)
        if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] == "pods":
            ns = rest[1]
            if len(rest) == 3:
                return await self._list(request, ns)
            pod = self.pods.get(ns, {}).get(rest[3])
            if pod is None:
                return _status(404, f'pods "{rest[3]}" not found', "NotFound")
            if len(rest) == 4 and request.method == "GET":
                return web.json_response(pod)
            if len(rest) == 5 and rest[4] == "log":
                return await self._logs(request, pod)
            if len(rest) == 5 and rest[4] in ("exec", "attach"):
                return await self._exec(request, pod, rest[4], mode)
            if len(rest) == 5 and rest[4] == "portforward":
                return await self._portforward(request, pod)
        return _status(404, f"the server could not find the requested resource ({path})", "NotFound")

    async def _list(self, request: web.Request, ns: str | None) -> web.StreamResponse:
        pods = [p for n, items in self.pods.items() if ns in (None, n) for p in items.values()]
        if request.query.get("watch") in ("1", "true"):
            return await self._watch(request, ns)
        if _wants_table(request):
            return web.json_response(_table(pods))
        return web.json_response({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "1"},
                                  "items": pods})

    async def _watch(self, request: web.Request, ns: str | None) -> web.StreamResponse:
        """A MODIFIED event for the 'ticker' pod every 0.1 s (its restart count goes up)."""
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        assert self._stopping is not None
        for n in range(1, 600):
            pod = make_pod("default", "ticker", ["app"], restarts=n)
            pod["metadata"]["resourceVersion"] = str(1 + n)
            obj: dict[str, Any] = _table([pod], str(1 + n)) if _wants_table(request) else pod
            await response.write(json.dumps({"type": "MODIFIED", "object": obj}).encode() + b"\n")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), 0.1)
            if self._stopping.is_set():
                break
        return response

    async def _logs(self, request: web.Request, pod: dict[str, Any]) -> web.StreamResponse:
        container = request.query.get("container") or pod["spec"]["containers"][0]["name"]
        response = web.StreamResponse(headers={"Content-Type": "text/plain"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        follow = request.query.get("follow") in ("1", "true")
        assert self._stopping is not None
        given = self.log_chunks.get(f"{pod['metadata']['name']}/{container}")
        if given is not None:  # set by a test: these chunks, each in its own write
            for chunk in given:
                await response.write(chunk)
            return response
        for n in range(1, 600 if follow else 4):
            await response.write(f"log line {n} from {pod['metadata']['name']}/{container}\n".encode())
            if follow:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), 0.05)
                if self._stopping.is_set():
                    break
        return response

    # -- exec and attach ------------------------------------------------------------

    async def _exec(self, request: web.Request, pod: dict[str, Any], kind: str, mode: str) -> web.StreamResponse:
        q = request.query
        containers = [c["name"] for c in pod["spec"]["containers"]]
        container = q.get("container") or containers[0]
        if container not in containers:
            return _status(400, f"container {container} is not valid for pod {pod['metadata']['name']}",
                           "BadRequest")
        if "websocket" not in request.headers.get("Upgrade", "").lower():
            return _status(400, "Upgrade request required", "BadRequest")

        def flag(name: str) -> bool:
            return q.get(name, "false").lower() in ("1", "true")

        stdin, tty = flag("stdin"), flag("tty")
        argv = q.getall("command", []) if kind == "exec" else ATTACH_PROGRAMS.get(pod["metadata"]["name"], ["cat"])
        if not argv:
            return _status(400, "you must specify at least one command for the container", "BadRequest")
        protocols = (V4,) if mode == "v4only" else (V5, V4)
        ws = web.WebSocketResponse(protocols=protocols, max_msg_size=0, compress=False)
        await ws.prepare(request)
        with self._lock:
            self.execs.append({"kind": kind, "argv": argv, "container": container, "tty": tty, "stdin": stdin,
                               "protocol": ws.ws_protocol, "pod": pod["metadata"]["name"],
                               "headers": list(request.headers.items())})
        if ws.ws_protocol is None:
            await ws.close()
            return ws
        runner = _Process(ws, argv, tty, stdin, self.dir, ws.ws_protocol == V5, self._procs)
        await runner.run()
        return ws

    # -- port-forward ---------------------------------------------------------------

    async def _portforward(self, request: web.Request, pod: dict[str, Any]) -> web.StreamResponse:
        meta = pod["metadata"]
        return await portforward.serve(request, f"{meta['namespace']}/{meta['name']}")


def _kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


def _controlling_tty() -> None:  # in the child, after setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class _Process:
    """A real process behind one exec/attach WebSocket."""

    def __init__(self, ws: web.WebSocketResponse, argv: list[str], tty: bool, stdin: bool, cwd: Path, v5: bool,
                 registry: set[asyncio.subprocess.Process]) -> None:
        self.ws, self.argv, self.tty, self.stdin, self.cwd, self.v5 = ws, argv, tty, stdin, cwd, v5
        self.registry = registry
        self.master: int | None = None
        self.proc: asyncio.subprocess.Process | None = None
        self._early: list[Any] = []

    async def _initial_size(self) -> tuple[int, int]:
        """kubectl sends the terminal size first: start the process with it (no race with stty)."""
        try:
            msg = await self.ws.receive(timeout=2)
        except TimeoutError:
            return 80, 24
        if msg.type == WSMsgType.BINARY and msg.data[:1] == b"\x04":
            size = json.loads(msg.data[1:])
            return int(size["Width"]), int(size["Height"])
        self._early.append(msg)
        return 80, 24

    async def run(self) -> None:
        env = dict(SHELL_ENV, HOME=str(self.cwd), HOSTNAME="standin-pod")
        try:
            if self.tty:
                cols, rows = await self._initial_size()
                master, slave = pty.openpty()
                _winsize(master, cols, rows)
                env["TERM"] = "xterm"
                try:
                    self.proc = await asyncio.create_subprocess_exec(
                        *self.argv, stdin=slave, stdout=slave, stderr=slave, cwd=self.cwd, env=env,
                        start_new_session=True, preexec_fn=_controlling_tty)
                finally:
                    os.close(slave)
                self.master = master
                os.set_blocking(master, False)
            else:
                self.proc = await asyncio.create_subprocess_exec(
                    *self.argv, stdin=asyncio.subprocess.PIPE if self.stdin else asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=self.cwd, env=env,
                    start_new_session=True)
        except OSError as exc:
            await self._status(f"failed to start {self.argv[0]}: {exc}", None)
            await self.ws.close()
            return
        self.registry.add(self.proc)
        readers = ([asyncio.create_task(self._read_pty())] if self.tty else
                   [asyncio.create_task(self._read_pipe(self.proc.stdout, 1)),  # type: ignore[arg-type]
                    asyncio.create_task(self._read_pipe(self.proc.stderr, 2))])  # type: ignore[arg-type]
        inbound = asyncio.create_task(self._inbound())
        try:
            await asyncio.gather(*readers)
            code = await self.proc.wait()
            code = code if code >= 0 else 128 - code
            await self._status(None, code)
        finally:
            inbound.cancel()
            _kill(self.proc)
            self.registry.discard(self.proc)
            if self.master is not None:
                with contextlib.suppress(OSError):
                    os.close(self.master)
            await self.ws.close()

    async def _status(self, message: str | None, code: int | None) -> None:
        if code == 0:
            body: dict[str, Any] = {"metadata": {}, "status": "Success"}
        elif code is not None:
            body = {"metadata": {}, "status": "Failure",
                    "message": f"command terminated with non-zero exit code: error executing command "
                               f"[{' '.join(self.argv)}], exit code {code}",
                    "reason": "NonZeroExitCode",
                    "details": {"causes": [{"reason": "ExitCode", "message": str(code)}]}}
        else:
            body = {"metadata": {}, "status": "Failure", "message": message, "reason": "InternalError"}
        with contextlib.suppress(ConnectionError, RuntimeError):
            await self.ws.send_bytes(b"\x03" + json.dumps(body).encode())

    async def _read_pipe(self, stream: asyncio.StreamReader, channel: int) -> None:
        while data := await stream.read(32 * 1024):
            await self.ws.send_bytes(bytes([channel]) + data)
        if self.v5:
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.ws.send_bytes(bytes([255, channel]))

    async def _read_pty(self) -> None:
        assert self.master is not None
        loop = asyncio.get_running_loop()
        while True:
            ready = loop.create_future()
            loop.add_reader(self.master, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_reader(self.master)
            try:
                data = os.read(self.master, 65536)
            except BlockingIOError:
                continue
            except OSError:  # EIO: every slave end is closed
                return
            if not data:
                return
            await self.ws.send_bytes(b"\x01" + data)

    async def _write(self, data: bytes) -> None:
        assert self.proc is not None
        if self.master is not None:
            loop = asyncio.get_running_loop()
            view = memoryview(data)
            while view:
                try:
                    view = view[os.write(self.master, view):]
                except BlockingIOError:
                    ready = loop.create_future()
                    loop.add_writer(self.master, ready.set_result, None)
                    try:
                        await ready
                    finally:
                        loop.remove_writer(self.master)
        elif self.proc.stdin is not None:
            self.proc.stdin.write(data)
            with contextlib.suppress(ConnectionError):
                await self.proc.stdin.drain()

    async def _inbound(self) -> None:
        assert self.proc is not None

        async def messages() -> Any:
            for early in self._early:
                yield early
            async for msg in self.ws:
                yield msg

        async for msg in messages():
            if msg.type != WSMsgType.BINARY or not msg.data:
                continue
            ch, data = msg.data[0], msg.data[1:]
            if ch == 0 and self.stdin:
                with contextlib.suppress(OSError):
                    await self._write(data)
            elif ch == 4 and self.master is not None:
                size = json.loads(data)
                _winsize(self.master, int(size["Width"]), int(size["Height"]))
            elif ch == 255 and data[:1] == b"\x00":
                if self.master is not None:
                    await self._write(b"\x04")
                elif self.proc.stdin is not None:
                    self.proc.stdin.close()
        # the client went away: nothing left to run for
        _kill(self.proc)
