"""A real OIDC provider (Node ``oidc-provider``, tests/oidc/provider.mjs) for tests.

Access tokens are RS256 JWTs with ``aud`` = the configured audience, ``groups``/``email``
plus any ``extra`` claims of the client, and ``sub`` = client_id for client_credentials
tokens (the login name for device-flow tokens).
"""

from __future__ import annotations

import base64
import fcntl
import json
import os
import re
import select
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from http.cookiejar import CookieJar
from pathlib import Path
from typing import Any

OIDC_DIR = Path(__file__).resolve().parent.parent / "oidc"
DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def ensure_node_modules() -> None:
    """Install tests/oidc/node_modules from the lock file unless already there."""
    marker = OIDC_DIR / "node_modules" / "oidc-provider" / "package.json"
    if marker.exists():
        return
    # xdist workers race here; the loser waits on the lock, then sees the finished install.
    with open(OIDC_DIR / ".npm-install.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not marker.exists():
            subprocess.run(
                ["npm", "ci", "--no-audit", "--no-fund"],
                cwd=OIDC_DIR,
                check=True,
                stdout=subprocess.DEVNULL,
                timeout=300,
            )


def _request(
    url: str,
    data: dict | None = None,
    auth: tuple[str, str] | None = None,
    opener: urllib.request.OpenerDirector | None = None,
) -> tuple[str, bytes]:
    """GET (or form POST when data is given); returns (final url, body)."""
    req = urllib.request.Request(url, urllib.parse.urlencode(data).encode() if data else None)
    if auth:
        # Percent-encode first, as RFC 6749 §2.3.1 requires for client_secret_basic.
        user, pw = (urllib.parse.quote(s, safe="") for s in auth)
        req.add_header(
            "Authorization", "Basic " + base64.b64encode(f"{user}:{pw}".encode()).decode()
        )
    try:
        with (opener or urllib.request.build_opener()).open(req, timeout=10) as resp:
            return resp.geturl(), resp.read()
    except urllib.error.HTTPError as e:
        # The provider's JSON error body is far more useful than the bare status line.
        raise RuntimeError(f"{url}: HTTP {e.code}: {e.read().decode(errors='replace')}") from None


class OIDCProvider:
    """``with OIDCProvider(clients=[{"client_id": ..., "client_secret": ..., "groups": [...],
    "email": ..., "extra": {...}}]) as idp: idp.token("client")``"""

    def __init__(
        self,
        clients: list[dict[str, Any]] = (),
        audience: str = "guarita",
        token_ttl: int = 600,
        jwks_file: str | os.PathLike | None = None,
        port: int = 0,
        users: list[dict[str, Any]] = (),
        device_client_id: str = "bastion-cli",
        start_timeout: float = 30.0,
        device_interval: int | None = None,
        web_clients: list[dict[str, Any]] = (),
    ):
        self.clients = {c["client_id"]: c for c in clients}
        self.users = list(users)
        self.audience, self.token_ttl, self.jwks_file = audience, token_ttl, jwks_file
        self.port, self.device_client_id, self.start_timeout = port, device_client_id, start_timeout
        self.device_interval = device_interval
        # Public browser clients (authorization code + PKCE): {client_id, redirect_uris}.
        self.web_clients = list(web_clients)
        self.issuer: str | None = None
        self._proc: subprocess.Popen | None = None
        self._stderr = None
        self._discovery: dict | None = None

    def __enter__(self) -> OIDCProvider:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> OIDCProvider:
        ensure_node_modules()
        env = dict(
            os.environ,
            OIDC_CLIENTS=json.dumps(list(self.clients.values())),
            OIDC_USERS=json.dumps(self.users),
            OIDC_AUDIENCE=self.audience,
            OIDC_TOKEN_TTL=str(self.token_ttl),
            OIDC_DEVICE_CLIENT_ID=self.device_client_id,
            OIDC_WEB_CLIENTS=json.dumps(self.web_clients),
        )
        env.pop("OIDC_JWKS_FILE", None)
        env.pop("OIDC_DEVICE_INTERVAL", None)
        if self.device_interval:
            env["OIDC_DEVICE_INTERVAL"] = str(self.device_interval)
        if self.jwks_file:
            env["OIDC_JWKS_FILE"] = str(self.jwks_file)
        # stderr goes to a file: an unread pipe could fill up and block node.
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen(
            ["node", str(OIDC_DIR / "provider.mjs"), str(self.port)],
            cwd=OIDC_DIR,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        try:
            line = self._read_ready_line()
            self.issuer = line.removeprefix("READY ").strip()
            self.port = urllib.parse.urlsplit(self.issuer).port
        except BaseException:
            self.stop()
            raise
        return self

    def _read_ready_line(self) -> str:
        deadline = time.monotonic() + self.start_timeout
        buf = b""
        fd = self._proc.stdout.fileno()
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"OIDC provider not ready in {self.start_timeout}s{self._log()}")
            if select.select([fd], [], [], remaining)[0]:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise RuntimeError(f"OIDC provider exited ({self._proc.wait()}){self._log()}")
                buf += chunk
        line = buf.decode().splitlines()[0]
        if not line.startswith("READY "):
            raise RuntimeError(f"unexpected provider output {line!r}{self._log()}")
        return line

    def _log(self) -> str:
        self._stderr.seek(0)
        return "\n--- provider stderr ---\n" + self._stderr.read().decode(errors="replace")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            proc.stdout.close()
        if self._stderr is not None:
            self._stderr.close()
            self._stderr = None
        self._discovery = None

    def discovery(self) -> dict:
        if self._discovery is None:
            self._discovery = json.loads(
                _request(f"{self.issuer}/.well-known/openid-configuration")[1]
            )
        return self._discovery

    @property
    def jwks_uri(self) -> str:
        return self.discovery()["jwks_uri"]

    def token_response(
        self, client_id: str, resource: str | None = None, scope: str | None = None
    ) -> dict:
        """client_credentials grant; ``resource`` (absolute URI) overrides the audience."""
        data = {"grant_type": "client_credentials"}
        if resource:
            data["resource"] = resource
        if scope:
            data["scope"] = scope
        secret = self.clients[client_id]["client_secret"]
        _, body = _request(self.discovery()["token_endpoint"], data, auth=(client_id, secret))
        return json.loads(body)

    def token(self, client_id: str, resource: str | None = None) -> str:
        return self.token_response(client_id, resource=resource)["access_token"]

    def device_authorization(self, scope: str = "openid offline_access") -> dict:
        """Start a device flow for the public device client; returns the RFC 8628 response."""
        _, body = _request(
            self.discovery()["device_authorization_endpoint"],
            {"client_id": self.device_client_id, "scope": scope},
        )
        return json.loads(body)

    def approve_device(self, verification_uri_complete: str, login: str) -> None:
        """Play the user's browser: confirm the code, log in as ``login`` (any name), consent.

        Scrapes oidc-provider's dev-interaction HTML forms (pinned via package-lock.json).
        """
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(CookieJar()))
        url, body = _request(verification_uri_complete, opener=opener)
        for _ in range(6):
            page = body.decode()
            action = re.search(r'<form[^>]*action="([^"]+)"', page)
            if action is None:
                if "Sign-in Success" not in page:
                    raise RuntimeError(f"device approval failed: {page[-500:]}")
                return
            fields = dict(re.findall(r'<input[^>]*name="([^"]+)"[^>]*value="([^"]*)"', page))
            if 'name="login"' in page:
                fields.update(login=login, password="any")
            url, body = _request(urllib.parse.urljoin(url, action.group(1)), fields, opener=opener)
        raise RuntimeError("device approval did not finish")

    def device_token(self, device_code: str) -> dict:
        _, body = _request(
            self.discovery()["token_endpoint"],
            {
                "grant_type": DEVICE_GRANT,
                "device_code": device_code,
                "client_id": self.device_client_id,
            },
        )
        return json.loads(body)


    def revoke(self, token: str, token_type_hint: str = "refresh_token") -> None:
        """RFC 7009 revocation by the public device client (as a user's logout or an admin would)."""
        _request(
            self.discovery()["revocation_endpoint"],
            {"token": token, "token_type_hint": token_type_hint, "client_id": self.device_client_id},
        )

    def exchange(self, client_id: str, subject_token: str, actor_token: str, actor_issuer: str | None = None) -> str:
        """RFC 8693 token exchange by ``client_id``: a token for the subject of
        ``subject_token`` whose ``act`` claim names the actor of ``actor_token`` (and nests
        the subject token's own ``act``, so exchanging again makes a longer chain)."""
        access = "urn:ietf:params:oauth:token-type:access_token"
        data = {"grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                "subject_token": subject_token, "subject_token_type": access,
                "actor_token": actor_token, "actor_token_type": access}
        if actor_issuer:  # the test provider then vouches for the actor under that issuer's name
            data["actor_issuer"] = actor_issuer
        secret = self.clients[client_id]["client_secret"]
        _, body = _request(self.discovery()["token_endpoint"], data, auth=(client_id, secret))
        return json.loads(body)["access_token"]


def make_rsa_jwks(path: str | os.PathLike, kid: str) -> dict:
    """Write a fresh private RS256 JWKS to ``path`` (for OIDC_JWKS_FILE / key rotation)."""
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jwt.algorithms import RSAAlgorithm

    key = RSAAlgorithm.to_jwk(
        rsa.generate_private_key(public_exponent=65537, key_size=2048), as_dict=True
    )
    jwks = {"keys": [{**key, "kid": kid, "alg": "RS256", "use": "sig"}]}
    Path(path).write_text(json.dumps(jwks))
    return jwks
