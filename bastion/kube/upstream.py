"""The gateway's own way into each cluster: server URL, CA and credentials.

Read from a kubeconfig (a context, or its current context) or from the in-cluster
service account. Files are watched: when the kubeconfig, the token file, the CA or the
client certificate changes on disk (a rotated projected service-account token, a renewed
certificate), the next request uses the new one. The agent never sees any of it: every
request carries the gateway's credentials plus ``Impersonate-User`` / ``Impersonate-Group``.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import ssl
import tempfile
import time
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from bastion.config import ClusterConfig

log = logging.getLogger("guarita.kube")

# Stat the credential files at most this often (the in-cluster token rotates hourly).
RECHECK_SECONDS = 1.0
# The body of a refused WebSocket handshake (aiohttp drops it) is caught here: the caller
# puts a dict in the variable, the response class fills it in.
handshake_body: ContextVar[dict[str, bytes] | None] = ContextVar("handshake_body", default=None)


class UpstreamConfigError(Exception):
    """The gateway's credentials for a cluster cannot be read; the message says why."""


@dataclass(frozen=True)
class Credentials:
    server: str  # https://host:port[/prefix], no trailing slash
    ssl: ssl.SSLContext | bool
    token: str | None
    server_hostname: str | None = None

    def auth_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}


class _Response(aiohttp.ClientResponse):
    async def start(self, connection: Any) -> aiohttp.ClientResponse:
        await super().start(connection)
        holder = handshake_body.get()
        if holder is not None and self.status != 101:
            body = b""
            with contextlib.suppress(aiohttp.ClientError, ValueError):
                while len(body) < 64 * 1024:
                    chunk = await self.content.read(64 * 1024 - len(body))
                    if not chunk:
                        break
                    body += chunk
            holder["body"] = body
            holder["content_type"] = self.headers.get("Content-Type", "").encode()
        return self


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=False)
    except ValueError as exc:
        raise UpstreamConfigError(f"{what} is not base64: {exc}") from None


@contextlib.contextmanager
def _as_files(cert: bytes | Path, key: bytes | Path) -> Iterator[tuple[str, str]]:
    """ssl wants file names: inline kubeconfig data goes to private temp files for a moment."""
    made: list[str] = []
    try:
        paths = []
        for item in (cert, key):
            if isinstance(item, Path):
                paths.append(str(item))
                continue
            fd, name = tempfile.mkstemp(prefix="guarita-kube-")
            made.append(name)
            with os.fdopen(fd, "wb") as f:
                f.write(item)
            paths.append(name)
        yield paths[0], paths[1]
    finally:
        for name in made:
            with contextlib.suppress(OSError):
                os.unlink(name)


def _ssl_context(ca: bytes | Path | None, cert: bytes | Path | None, key: bytes | Path | None,
                 insecure: bool) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif isinstance(ca, Path):
        context.load_verify_locations(cafile=str(ca))
    elif ca is not None:
        context.load_verify_locations(cadata=ca.decode("ascii", "replace"))
    if cert is not None and key is not None:
        with _as_files(cert, key) as (cert_file, key_file):
            context.load_cert_chain(cert_file, key_file)
    return context


def _named(items: Any, name: str, kind: str, source: Path) -> dict[str, Any]:
    for item in items or []:
        if isinstance(item, dict) and item.get("name") == name:
            body = item.get(kind)
            if isinstance(body, dict):
                return body
    raise UpstreamConfigError(f"{source}: no {kind} named {name!r}")


class ClusterUpstream:
    """Credentials for one cluster, re-read when their files change."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._creds: Credentials | None = None
        self._stamp: tuple[Any, ...] = ()
        self._watched: list[Path] = []
        self._checked = 0.0
        self.session: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        self.current()  # fail at start-up, not at the first request, on an unreadable config
        timeout = aiohttp.ClientTimeout(total=None, connect=None, sock_connect=self.config.connect_timeout,
                                        sock_read=None)
        self.session = aiohttp.ClientSession(timeout=timeout, auto_decompress=False, response_class=_Response,
                                             connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=30),
                                             skip_auto_headers=("User-Agent", "Accept-Encoding"))

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
            self.session = None

    # -- credentials --------------------------------------------------------------------

    def current(self) -> Credentials:
        now = time.monotonic()
        if self._creds is not None and now - self._checked < RECHECK_SECONDS:
            return self._creds
        self._checked = now
        stamp = self._stat(self._watched) if self._watched else ()
        if self._creds is None or stamp != self._stamp:
            try:
                creds, watched = self._load()
            except UpstreamConfigError:
                if self._creds is None:
                    raise
                log.exception("cluster %s: keeping the previous credentials", self.config.name)
                return self._creds
            self._creds, self._watched = creds, watched
            self._stamp = self._stat(watched)
            if stamp:
                log.info("cluster %s: credentials re-read", self.config.name)
        return self._creds

    @staticmethod
    def _stat(paths: list[Path]) -> tuple[Any, ...]:
        out: list[Any] = []
        for p in paths:
            try:
                st = p.stat()
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append(None)
        return tuple(out)

    def _load(self) -> tuple[Credentials, list[Path]]:
        if self.config.in_cluster:
            return self._load_in_cluster()
        assert self.config.kubeconfig is not None
        return self._load_kubeconfig(self.config.kubeconfig, self.config.context)

    def _load_in_cluster(self) -> tuple[Credentials, list[Path]]:
        sa = self.config.service_account_dir
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if not host or not port:
            raise UpstreamConfigError(f"cluster {self.config.name}: in_cluster = true but KUBERNETES_SERVICE_HOST/"
                                      "KUBERNETES_SERVICE_PORT are not set (is the gateway running in a pod?)")
        token_file, ca_file = sa / "token", sa / "ca.crt"
        try:
            token = token_file.read_text().strip()
        except OSError as exc:
            raise UpstreamConfigError(f"cluster {self.config.name}: cannot read {token_file}: {exc.strerror}") from None
        try:
            context = _ssl_context(ca_file, None, None, False)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamConfigError(f"cluster {self.config.name}: cannot load {ca_file}: {exc}") from None
        host = f"[{host}]" if ":" in host else host
        return Credentials(f"https://{host}:{port}", context, token), [token_file, ca_file]

    def _load_kubeconfig(self, path: Path, context_name: str | None) -> tuple[Credentials, list[Path]]:
        try:
            doc = yaml.safe_load(path.read_text())
        except OSError as exc:
            raise UpstreamConfigError(f"cannot read kubeconfig {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise UpstreamConfigError(f"kubeconfig {path} is not valid YAML: {exc}") from None
        if not isinstance(doc, dict):
            raise UpstreamConfigError(f"kubeconfig {path} is not a kubeconfig (expected a mapping)")
        name = context_name or doc.get("current-context")
        if not name:
            raise UpstreamConfigError(f"kubeconfig {path} has no current-context: set context = NAME for the cluster")
        ctx = _named(doc.get("contexts"), name, "context", path)
        cluster = _named(doc.get("clusters"), str(ctx.get("cluster")), "cluster", path)
        user = _named(doc.get("users"), str(ctx.get("user")), "user", path) if ctx.get("user") else {}
        base = path.parent
        watched = [path]

        def file(value: Any) -> Path:
            p = Path(str(value)).expanduser()
            p = p if p.is_absolute() else base / p
            watched.append(p)
            return p

        server = str(cluster.get("server") or "").rstrip("/")
        if not server.startswith("https://"):
            raise UpstreamConfigError(f"kubeconfig {path}: cluster server must be an https:// URL, got {server!r}")
        unsupported = [k for k in ("exec", "auth-provider", "username", "password") if user.get(k)]
        if unsupported:
            raise UpstreamConfigError(f"kubeconfig {path}: user {ctx.get('user')!r} uses {', '.join(unsupported)}; "
                                      "the gateway's own credentials must be a token, tokenFile or client certificate")
        ca: bytes | Path | None = None
        if cluster.get("certificate-authority-data"):
            ca = _b64(str(cluster["certificate-authority-data"]), "certificate-authority-data")
        elif cluster.get("certificate-authority"):
            ca = file(cluster["certificate-authority"])
        cert: bytes | Path | None = None
        key: bytes | Path | None = None
        if user.get("client-certificate-data"):
            cert = _b64(str(user["client-certificate-data"]), "client-certificate-data")
        elif user.get("client-certificate"):
            cert = file(user["client-certificate"])
        if user.get("client-key-data"):
            key = _b64(str(user["client-key-data"]), "client-key-data")
        elif user.get("client-key"):
            key = file(user["client-key"])
        if (cert is None) != (key is None):
            raise UpstreamConfigError(f"kubeconfig {path}: a client certificate needs its key (and the other way round)")
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token_path = file(user["tokenFile"])
            try:
                token = token_path.read_text().strip()
            except OSError as exc:
                raise UpstreamConfigError(f"kubeconfig {path}: cannot read tokenFile {token_path}: {exc.strerror}") from None
        insecure = bool(cluster.get("insecure-skip-tls-verify"))
        if insecure:
            log.warning("cluster %s: insecure-skip-tls-verify is set: the API server's identity is NOT checked",
                        self.config.name)
        try:
            context = _ssl_context(ca, cert, key, insecure)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise UpstreamConfigError(f"kubeconfig {path}: cannot load the CA or client certificate: {exc}") from None
        server_name = cluster.get("tls-server-name")
        return Credentials(server, context, str(token) if token else None,
                           str(server_name) if server_name else None), watched
