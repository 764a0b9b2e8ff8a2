"""Signing in to the console: OIDC authorization code with PKCE, the session cookie, CSRF, roles.

The session cookie holds the access token the issuer gave the browser (HttpOnly, SameSite=Lax,
Secure outside --dev). Every request verifies it with the gateway's TokenVerifier, exactly as
the API verifies a bearer token: no session table, no key of the console's own, and any replica
accepts it. It lives as long as the token; a forged, expired or foreign-issuer cookie is
cleared and the browser is sent to sign in again.

CSRF: every change is a POST carrying ``csrf``, a hash of the session token the page was
rendered with; a cross-site page cannot read the HttpOnly cookie, so it cannot compute it.
The Origin header, when the browser sends one, must be this gateway's.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import aiohttp
from aiohttp import web

from bastion.console.settings import ConsoleConfig, console_settings
from bastion.control import has_role
from bastion.identity import AuthError, Identity

if TYPE_CHECKING:
    from bastion.services import Services

Role = Literal["operator", "auditor", "approver"]
MAX_COOKIE_TOKEN = 3800  # browsers keep at most ~4 KiB per cookie
LOGIN_TTL = 600


@dataclass(frozen=True)
class Viewer:
    """Who is looking at a page: the verified identity, the roles it has, its CSRF token."""

    identity: Identity
    roles: frozenset[str]
    csrf: str

    def has(self, *roles: Role) -> bool:
        return any(r in self.roles for r in roles)


def cookie_names(dev: bool) -> tuple[str, str]:
    """(session, sign-in) cookie names: ``__Host-`` (Secure, Path=/, no Domain) outside --dev."""
    return ("guarita_console", "guarita_login") if dev else ("__Host-guarita_console", "__Host-guarita_login")


def csrf_for(token: str) -> str:
    return hashlib.sha256(b"guarita-console-csrf\0" + token.encode()).hexdigest()[:40]


def is_approver(gw: Services, identity: Identity) -> bool:
    """In an approver group of some rule (or of the defaults)."""
    policy = gw.config.approvals
    patterns = {p for rule in policy.rules for p in rule.approvers} | set(policy.defaults.approvers)
    return any(fnmatch.fnmatchcase(g, p) for g in identity.groups for p in patterns)


def roles_for(gw: Services, identity: Identity) -> frozenset[str]:
    found = {r for r in ("operator", "auditor") if has_role(gw.config.roles, identity, r)}
    if is_approver(gw, identity):
        found.add("approver")
    return frozenset(found)


def _cookie_options(gw: Services, max_age: int) -> dict[str, Any]:
    return {"httponly": True, "secure": not gw.config.dev, "samesite": "Lax", "path": "/", "max_age": max_age}


async def viewer_of(gw: Services, request: web.Request) -> Viewer | AuthError | None:
    """The signed-in viewer; None without a cookie; the AuthError when the cookie is refused."""
    token = request.cookies.get(cookie_names(gw.config.dev)[0])
    if not token:
        return None
    try:
        identity = await gw.verifier.verify(token, method="console")
    except AuthError as exc:
        gw.audit.emit("auth.failure", method="console", source=request.remote, path=request.path,
                      reason=exc.reason, detail=str(exc))
        return exc
    return Viewer(identity, roles_for(gw, identity), csrf_for(token))


def same_origin(request: web.Request, public_url: str | None = None) -> bool:
    """The Origin, when sent, is this gateway: as the request names it, or ``console.url``
    (behind a proxy that rewrites Host)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True  # not sent (older browsers on same-origin POSTs): the CSRF token decides
    netloc = urllib.parse.urlsplit(origin).netloc
    return netloc == request.host or (public_url is not None and netloc == urllib.parse.urlsplit(public_url).netloc)


def csrf_ok(viewer: Viewer, request: web.Request, form: Any, public_url: str | None = None) -> bool:
    sent = str(form.get("csrf") or request.headers.get("X-CSRF-Token") or "")
    return same_origin(request, public_url) and hmac.compare_digest(sent.encode(), viewer.csrf.encode())


# -- the OIDC client ---------------------------------------------------------------------------


class SignInError(Exception):
    """A sign-in that cannot go on, with a one-line reason for the person."""


class OidcClient:
    """Discovery, the authorization redirect and the code exchange for the console's client."""

    def __init__(self, gw: Services) -> None:
        self.gw = gw
        self._discovery: dict[str, tuple[float, dict[str, Any]]] = {}

    def settings(self) -> ConsoleConfig:
        found = console_settings(self.gw.config)
        if found is None:
            raise SignInError("the console is not configured: add a [console] table with the client_id registered "
                              "at your OIDC issuer (docs/console.md)")
        return found

    def issuer(self) -> str:
        chosen = self.settings().issuer
        return (chosen or self.gw.config.issuers[0].issuer).rstrip("/")

    async def discovery(self) -> dict[str, Any]:
        issuer = self.issuer()
        cached = self._discovery.get(issuer)
        if cached and time.monotonic() - cached[0] < 300:
            return cached[1]
        url = issuer + "/.well-known/openid-configuration"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                    http.get(url) as response:
                if response.status != 200:
                    raise SignInError(f"the issuer's discovery document {url} answered HTTP {response.status}")
                doc = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SignInError(f"cannot reach the issuer's discovery document {url}: {exc or type(exc).__name__}") \
                from None
        if not isinstance(doc, dict) or not doc.get("authorization_endpoint") or not doc.get("token_endpoint"):
            raise SignInError(f"{url} names no authorization_endpoint and token_endpoint: the issuer cannot sign "
                              "people in with the authorization code flow")
        self._discovery[issuer] = (time.monotonic(), doc)
        return doc

    def redirect_uri(self, request: web.Request) -> str:
        base = self.settings().url or f"{request.scheme}://{request.host}"
        return base + "/console/callback"

    async def begin(self, request: web.Request, next_path: str) -> tuple[str, str, str]:
        """(the issuer URL to send the browser to, the sign-in cookie value, its state)."""
        settings = self.settings()
        doc = await self.discovery()
        verifier = secrets.token_urlsafe(48)
        challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        state, nonce = secrets.token_urlsafe(24), secrets.token_urlsafe(16)
        query = {"response_type": "code", "client_id": settings.client_id, "redirect_uri": self.redirect_uri(request),
                 "scope": " ".join(settings.scopes), "state": state, "nonce": nonce,
                 "code_challenge": challenge, "code_challenge_method": "S256"}
        endpoint = str(doc["authorization_endpoint"])
        url = endpoint + ("&" if "?" in endpoint else "?") + urllib.parse.urlencode(query)
        cookie = base64.urlsafe_b64encode(json.dumps({"state": state, "verifier": verifier, "next": next_path,
                                                      "at": time.time()}).encode()).decode().rstrip("=")
        return url, cookie, state

    async def finish(self, request: web.Request, cookie: str | None) -> tuple[str, Identity, str]:
        """Check the callback against the sign-in cookie and trade the code:
        (access token, its identity, the page to go back to)."""
        query = request.query
        if query.get("error"):
            raise SignInError(f"the issuer refused the sign-in: {query.get('error')}"
                              + (f" ({query['error_description'][:200]})" if query.get("error_description") else ""))
        try:
            started = json.loads(base64.urlsafe_b64decode((cookie or "") + "=" * (-len(cookie or "") % 4)))
            state, verifier, next_path = str(started["state"]), str(started["verifier"]), str(started["next"])
            fresh = time.time() - float(started["at"]) < LOGIN_TTL
        except (ValueError, KeyError, TypeError):
            raise SignInError("this sign-in was not started here (or its cookie is gone): start again") from None
        if not fresh or not hmac.compare_digest(state.encode(), str(query.get("state", "")).encode()):
            raise SignInError("this sign-in is stale or does not match the one this browser started: start again")
        code = query.get("code")
        if not code:
            raise SignInError("the issuer sent no authorization code")
        doc = await self.discovery()
        form = {"grant_type": "authorization_code", "code": code, "redirect_uri": self.redirect_uri(request),
                "client_id": self.settings().client_id, "code_verifier": verifier}
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
                    http.post(str(doc["token_endpoint"]), data=form) as response:
                body = await response.json(content_type=None)
                if response.status != 200 or not isinstance(body, dict):
                    raise SignInError(f"the issuer refused the code: HTTP {response.status} "
                                      f"{str(body)[:200] if body else ''}")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            raise SignInError(f"cannot reach the issuer's token endpoint: {exc or type(exc).__name__}") from None
        token = str(body.get("access_token") or "")
        try:
            identity = await self.gw.verifier.verify(token, method="console")
        except AuthError as exc:
            raise SignInError(f"the issuer's access token is not one the gateway accepts ({exc}): the console "
                              "needs a JWT access token for the [[oidc]] audience, like agents' tokens") from None
        if len(token) > MAX_COOKIE_TOKEN:
            raise SignInError(f"the access token is {len(token)} bytes, more than a browser cookie holds "
                              f"({MAX_COOKIE_TOKEN}): ask the issuer for fewer claims")
        return token, identity, next_path


def safe_next(value: str | None) -> str:
    """Only paths of the console itself (no open redirect)."""
    if value and value.startswith("/console/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/console/"


def login_cookie_name(dev: bool, state: str) -> str:
    """One sign-in cookie per sign-in (named after its state): two tabs, or a page's background
    request that runs into the sign-in, never overwrite the sign-in under way."""
    return f"{cookie_names(dev)[1]}_{hashlib.sha256(state.encode()).hexdigest()[:16]}"


def session_cookie(gw: Services, response: web.StreamResponse, token: str, identity: Identity, state: str) -> None:
    name = cookie_names(gw.config.dev)[0]
    max_age = max(1, int(identity.expires_at - time.time())) if identity.expires_at else 3600
    response.set_cookie(name, token, **_cookie_options(gw, max_age))
    response.set_cookie(login_cookie_name(gw.config.dev, state), "", **_cookie_options(gw, 0))


def clear_session(gw: Services, response: web.StreamResponse) -> None:
    name, _ = cookie_names(gw.config.dev)
    response.set_cookie(name, "", **_cookie_options(gw, 0))


def login_cookie(gw: Services, response: web.StreamResponse, state: str, value: str) -> None:
    response.set_cookie(login_cookie_name(gw.config.dev, state), value, **_cookie_options(gw, LOGIN_TTL))


Handler = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]
