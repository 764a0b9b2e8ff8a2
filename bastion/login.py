"""``bastion login``: the OIDC device authorization grant (RFC 8628), and the cached login.

The issuer and client come from ``--issuer`` / ``--client-id`` (``--scope``,
``--audience``), else ``$GUARITA_LOGIN_ISSUER`` / ``$GUARITA_LOGIN_CLIENT_ID``
(``$GUARITA_LOGIN_SCOPE``, ``$GUARITA_LOGIN_AUDIENCE``), else the client config file
``~/.config/guarita/login.toml`` (``$GUARITA_LOGIN_CONFIG``)::

    issuer = "https://login.example.com/realms/ops"
    client_id = "guarita-cli"
    # scope = "openid offline_access"   (offline_access: a refresh token)
    # audience = "guarita"               (sent as audience and resource, for issuers that need one)
    # token = "access_token"             (or "id_token", for issuers whose access tokens are opaque)

The tokens go to the same cache as client-credentials tokens (``~/.cache/guarita/
token.json``, mode 0600, see bastion.doors.kube.client), under the ``login`` key: the access
token, the ID token, the refresh token, and where to refresh them. ``bastion token``,
``bastion ssh-cert`` and every CLI call that needs a token use it, refreshing it with
the refresh token shortly before it expires (under a file lock: kubectl may run several
credential plugins at once, and a rotated refresh token works only once).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
import time
import tomllib
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bastion.doors.kube.client import (
    REFRESH_MARGIN,
    TokenError,
    _read_cache,
    _write_private,
    cache_path,
    jwt_expiry,
)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPE = "openid offline_access"
SLOW_DOWN_STEP = 5.0  # RFC 8628 §3.5: on slow_down, poll 5 s less often from then on
RELOGIN = "run `bastion login`"


class LoginError(TokenError):
    """The login failed or cannot be used; the message says what to do."""


class LoginTimeout(LoginError):
    pass


@dataclass(frozen=True)
class LoginSettings:
    issuer: str
    client_id: str
    scope: str = DEFAULT_SCOPE
    audience: str | None = None
    token: str = "access_token"  # which token the gateway gets: access_token or id_token


def config_path() -> Path:
    if os.environ.get("GUARITA_LOGIN_CONFIG"):
        return Path(os.environ["GUARITA_LOGIN_CONFIG"]).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "guarita" / "login.toml"


def load_settings(issuer: str | None = None, client_id: str | None = None, scope: str | None = None,
                  audience: str | None = None, token: str | None = None) -> LoginSettings:
    """Flags, then environment, then the client config file."""
    path = config_path()
    file: dict[str, Any] = {}
    if path.exists():
        try:
            file = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise LoginError(f"{path}: not a valid login config: {exc}") from None
        unknown = set(file) - {"issuer", "client_id", "scope", "audience", "token"}
        if unknown:
            raise LoginError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: issuer, client_id, "
                             "scope, audience, token)")
    env = os.environ

    def pick(flag: str | None, name: str, key: str) -> str | None:
        value = flag or env.get(name) or file.get(key)
        return str(value) if value else None

    settings = {
        "issuer": pick(issuer, "GUARITA_LOGIN_ISSUER", "issuer"),
        "client_id": pick(client_id, "GUARITA_LOGIN_CLIENT_ID", "client_id"),
        "scope": pick(scope, "GUARITA_LOGIN_SCOPE", "scope") or DEFAULT_SCOPE,
        "audience": pick(audience, "GUARITA_LOGIN_AUDIENCE", "audience"),
        "token": pick(token, "GUARITA_LOGIN_TOKEN", "token") or "access_token",
    }
    missing = [k for k in ("issuer", "client_id") if not settings[k]]
    if missing:
        raise LoginError(f"bastion login needs the {' and '.join(missing).replace('_', ' ')} of your identity "
                         f"provider: pass --issuer URL --client-id ID, set GUARITA_LOGIN_ISSUER and "
                         f"GUARITA_LOGIN_CLIENT_ID, or write them in {path}")
    if settings["token"] not in ("access_token", "id_token"):
        raise LoginError(f"token must be 'access_token' or 'id_token', not {settings['token']!r}")
    issuer_url = str(settings["issuer"]).rstrip("/")
    parsed = urllib.parse.urlsplit(issuer_url)
    if parsed.scheme not in ("https", "http") or not parsed.hostname:
        raise LoginError(f"the issuer must be an https:// URL, not {issuer_url!r}")
    if parsed.scheme == "http" and not (parsed.hostname == "localhost" or parsed.hostname.startswith("127.")
                                        or parsed.hostname == "::1"):
        raise LoginError(f"the issuer {issuer_url} uses plain http: tokens would cross the network in clear "
                         "(plain http is accepted only on loopback)")
    return LoginSettings(issuer=issuer_url, client_id=str(settings["client_id"]), scope=str(settings["scope"]),
                         audience=settings["audience"], token=str(settings["token"]))


# -- HTTP ------------------------------------------------------------------------------------


def _get_json(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise LoginError(f"{url}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise LoginError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise LoginError(f"{url}: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise LoginError(f"{url}: the answer is not a JSON object")
    return doc


def post_form(url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    """POST a form; (HTTP status, JSON body). OAuth errors come back as 400 with a JSON body."""
    request = urllib.request.Request(url, data=urllib.parse.urlencode(form).encode(),
                                     headers={"Accept": "application/json",
                                              "Content-Type": "application/x-www-form-urlencoded"})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LoginError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    try:
        doc = json.loads(raw) if raw else {}
    except ValueError:
        doc = {"error": "invalid_response", "error_description": raw[:200].decode(errors="replace")}
    return status, doc if isinstance(doc, dict) else {"error": "invalid_response"}


def discover(issuer: str) -> dict[str, Any]:
    doc = _get_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
    if str(doc.get("issuer", "")).rstrip("/") != issuer.rstrip("/"):
        raise LoginError(f"{issuer}: the discovery document names issuer {doc.get('issuer')!r}")
    return doc


def _oauth_error(doc: dict[str, Any]) -> str:
    error = str(doc.get("error") or "error")
    description = doc.get("error_description")
    return f"{error}: {description}" if description else error


# -- the device flow ----------------------------------------------------------------------------


def start_device_flow(settings: LoginSettings, discovery: dict[str, Any]) -> dict[str, Any]:
    endpoint = discovery.get("device_authorization_endpoint")
    if not isinstance(endpoint, str):
        raise LoginError(f"{settings.issuer} does not offer the device authorization grant (no "
                         "device_authorization_endpoint in its discovery document)")
    form = {"client_id": settings.client_id, "scope": settings.scope}
    if settings.audience:
        form["audience"] = settings.audience
    status, doc = post_form(endpoint, form)
    if status != 200:
        raise LoginError(f"{settings.issuer} refused to start a device login: {_oauth_error(doc)}")
    for key in ("device_code", "user_code", "verification_uri"):
        if not isinstance(doc.get(key), str):
            raise LoginError(f"{endpoint}: the answer has no {key}")
    return doc


def poll_for_tokens(settings: LoginSettings, token_endpoint: str, start: dict[str, Any], timeout: float | None,
                    *, post: Callable[[str, dict[str, str]], tuple[int, dict[str, Any]]] = post_form,
                    sleep: Callable[[float], None] = time.sleep,
                    clock: Callable[[], float] = time.monotonic) -> dict[str, Any]:
    """Poll the token endpoint at the server's ``interval`` (more slowly after ``slow_down``)
    until the user finished, refused, the code expired, or ``timeout`` seconds passed."""
    interval = float(start.get("interval") or 5)
    expires_in = float(start.get("expires_in") or 600)
    limit = min(timeout, expires_in) if timeout is not None else expires_in
    deadline = clock() + limit
    form = {"grant_type": DEVICE_GRANT, "device_code": start["device_code"], "client_id": settings.client_id}
    while True:
        remaining = deadline - clock()
        if remaining <= 0:
            raise LoginTimeout(f"the sign-in was not completed within {_human(limit)}; nothing was cached. Run "
                               "`bastion login` again (and finish in the browser in time)")
        sleep(min(interval, remaining))  # the last poll is at the deadline: finished just in time counts
        status, doc = post(token_endpoint, form)
        if status == 200 and isinstance(doc.get("access_token"), str):
            return doc
        error = doc.get("error")
        if error == "authorization_pending":
            continue
        if error == "slow_down":
            interval += SLOW_DOWN_STEP
            continue
        if error == "access_denied":
            raise LoginError("the sign-in was refused at the identity provider; nothing was cached")
        if error == "expired_token":
            raise LoginError("the code expired before the sign-in was completed; run `bastion login` again")
        raise LoginError(f"the identity provider refused the login: {_oauth_error(doc)}")


def _human(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" + (f"{seconds % 60}s" if seconds % 60 else "")


# -- the cache ---------------------------------------------------------------------------------


@contextlib.contextmanager
def _cache_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _entry(settings: LoginSettings, discovery: dict[str, Any], tokens: dict[str, Any],
           previous: dict[str, Any] | None = None) -> dict[str, Any]:
    now = time.time()
    entry = dict(previous or {})
    entry.update({
        "issuer": settings.issuer, "client_id": settings.client_id, "scope": settings.scope,
        "audience": settings.audience, "token": settings.token,
        "token_endpoint": discovery.get("token_endpoint") or entry.get("token_endpoint"),
        "revocation_endpoint": discovery.get("revocation_endpoint") or entry.get("revocation_endpoint"),
        "access_token": tokens["access_token"], "issued_at": now,
        "expires_at": now + float(tokens.get("expires_in") or 300),
    })
    if tokens.get("id_token"):
        entry["id_token"] = tokens["id_token"]
    if tokens.get("refresh_token"):  # a rotated refresh token replaces the old one; else keep it
        entry["refresh_token"] = tokens["refresh_token"]
    entry["expires_at"] = jwt_expiry(gateway_token(entry) or "") or entry["expires_at"]
    return entry


def gateway_token(entry: dict[str, Any]) -> str | None:
    """The token the gateway gets: the access token when it is a JWT, else the ID token."""
    access, id_token = entry.get("access_token"), entry.get("id_token")
    if entry.get("token") == "id_token":
        return id_token if isinstance(id_token, str) else None
    if isinstance(access, str) and access.count(".") == 2:
        return access
    return id_token if isinstance(id_token, str) else (access if isinstance(access, str) else None)


def claims_of(token: str) -> dict[str, Any]:
    """The payload of a JWT, unverified (only to show who logged in)."""
    parts = token.split(".")
    if len(parts) != 3:
        return {}
    with contextlib.suppress(ValueError):
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return payload if isinstance(payload, dict) else {}
    return {}


def save_login(settings: LoginSettings, discovery: dict[str, Any], tokens: dict[str, Any]) -> dict[str, Any]:
    path = cache_path()
    with _cache_lock(path):
        cache = _read_cache(path) or {"tokens": {}}
        cache["login"] = _entry(settings, discovery, tokens)
        _write_private(path, json.dumps(cache))
    return dict(cache["login"])


def login_entry() -> dict[str, Any] | None:
    entry = _read_cache(cache_path()).get("login")
    return entry if isinstance(entry, dict) else None


def cached_token(now: float | None = None) -> str | None:
    """The logged-in token, refreshed with the refresh token when it is about to expire.
    None when nobody logged in; LoginError when the login can no longer be used."""
    path = cache_path()
    entry = login_entry()
    if entry is None:
        return None
    token = _fresh(entry, now)
    if token is not None:
        return token
    with _cache_lock(path):
        cache = _read_cache(path)
        entry = cache.get("login") if isinstance(cache.get("login"), dict) else None
        if entry is None:
            return None
        token = _fresh(entry, now)  # another process refreshed it while we waited for the lock
        if token is not None:
            return token
        refreshed = _refresh(entry)
        cache["login"] = refreshed
        _write_private(path, json.dumps(cache))
    token = gateway_token(refreshed)
    if token is None:
        raise LoginError(f"the identity provider's answer has no usable token; {RELOGIN}")
    return token


def _fresh(entry: dict[str, Any], now: float | None) -> str | None:
    token = gateway_token(entry)
    if token is None:
        return None
    now = time.time() if now is None else now
    expires = float(entry.get("expires_at") or 0)
    issued = float(entry.get("issued_at") or 0)
    margin = min(REFRESH_MARGIN, max(0.0, (expires - issued) * 0.1))
    return token if expires - margin > now else None


def _refresh(entry: dict[str, Any]) -> dict[str, Any]:
    issuer = entry.get("issuer", "the issuer")
    refresh_token = entry.get("refresh_token")
    if not isinstance(refresh_token, str) or not refresh_token:
        raise LoginError(f"your login at {issuer} expired and it gave no refresh token; {RELOGIN}")
    endpoint = entry.get("token_endpoint")
    if not isinstance(endpoint, str):
        endpoint = discover(str(issuer)).get("token_endpoint")
    if not isinstance(endpoint, str):
        raise LoginError(f"{issuer} has no token endpoint; {RELOGIN}")
    form = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": str(entry["client_id"])}
    status, doc = post_form(endpoint, form)
    if status != 200 or not isinstance(doc.get("access_token"), str):
        if doc.get("error") in ("invalid_grant", "invalid_token", "unauthorized_client", "invalid_client"):
            raise LoginError(f"{issuer} no longer accepts your login ({_oauth_error(doc)}): it was revoked or has "
                             f"expired; {RELOGIN}")
        raise LoginError(f"{issuer} did not refresh your login: {_oauth_error(doc)} (HTTP {status}); try again, "
                         f"or {RELOGIN}")
    settings = LoginSettings(issuer=str(issuer), client_id=str(entry["client_id"]),
                             scope=str(entry.get("scope") or DEFAULT_SCOPE), audience=entry.get("audience"),
                             token=str(entry.get("token") or "access_token"))
    return _entry(settings, {}, doc, previous=entry)


def logout() -> tuple[bool, str | None]:
    """Forget the cached tokens (the whole cache file). The refresh token is revoked at the
    issuer first when it offers RFC 7009 revocation. (removed anything, revocation problem)."""
    path = cache_path()
    problem = None
    with _cache_lock(path):
        cache = _read_cache(path)
        entry = cache.get("login") if isinstance(cache.get("login"), dict) else None
        if entry and entry.get("refresh_token") and entry.get("revocation_endpoint"):
            try:
                status, doc = post_form(str(entry["revocation_endpoint"]), {
                    "token": str(entry["refresh_token"]), "token_type_hint": "refresh_token",
                    "client_id": str(entry["client_id"])})
                if status != 200:
                    problem = f"the issuer did not revoke the refresh token: {_oauth_error(doc)}"
            except LoginError as exc:
                problem = str(exc)
        existed = path.exists()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    return existed, problem
