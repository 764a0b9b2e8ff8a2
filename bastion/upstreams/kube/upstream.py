"""The gateway's own way into each cluster: server URL, CA and credentials.

Read from a kubeconfig (a context, or its current context) or from the in-cluster
service account. Files are watched: when the kubeconfig, the token file, the CA or the
client certificate changes on disk (a rotated projected service-account token, a renewed
certificate), the next request uses the new one. The agent never sees any of it: every
request carries the gateway's credentials plus ``Impersonate-User`` / ``Impersonate-Group``.
"""

from __future__ import annotations

import asyncio
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

from bastion.config import ClusterConfig
from bastion.upstreams.kube.credentials import KubeconfigError
from bastion.upstreams.kube.credentials import load as load_kubeconfig

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


class ClusterUpstream:
    """Credentials for one cluster, re-read when their files change."""

    def __init__(self, config: ClusterConfig) -> None:
        self.config = config
        self._creds: Credentials | None = None
        self._stamp: tuple[Any, ...] = ()
        self._watched: list[Path] = []
        self._checked = 0.0
        self._expires: float | None = None  # exec plugin / OIDC credentials: load again after
        self._loading = asyncio.Lock()
        self.session: aiohttp.ClientSession | None = None

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        await self.credentials()  # fail at start-up, not at the first request, on an unreadable config
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

    async def credentials(self) -> Credentials:
        """The credentials to use now: re-read when a file they come from changed, and loaded
        again (an exec plugin run, an OIDC refresh) before they expire."""
        now = time.monotonic()
        expired = self._expires is not None and time.time() >= self._expires
        if self._creds is not None and now - self._checked < RECHECK_SECONDS and not expired:
            return self._creds
        async with self._loading:  # one plugin run for the requests that arrive meanwhile
            if self._creds is not None and time.monotonic() - self._checked < RECHECK_SECONDS and not (
                    self._expires is not None and time.time() >= self._expires):
                return self._creds
            self._checked = time.monotonic()
            stamp = self._stat(self._watched) if self._watched else ()
            expired = self._expires is not None and time.time() >= self._expires
            if self._creds is None or stamp != self._stamp or expired:
                try:
                    creds, watched, expires = await self._load()
                except UpstreamConfigError:
                    if self._creds is None:
                        raise
                    log.exception("cluster %s: keeping the previous credentials", self.config.name)
                    return self._creds
                self._creds, self._watched, self._expires = creds, watched, expires
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

    async def _load(self) -> tuple[Credentials, list[Path], float | None]:
        if self.config.in_cluster:
            return (*self._load_in_cluster(), None)
        assert self.config.kubeconfig is not None
        try:
            loaded = await load_kubeconfig(self.config.kubeconfig, self.config.context)
        except KubeconfigError as exc:
            raise UpstreamConfigError(str(exc)) from None
        return (Credentials(loaded.server, loaded.ssl, loaded.token, loaded.server_hostname), loaded.watched,
                loaded.expires)

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
