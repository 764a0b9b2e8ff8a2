"""Client side of the Kubernetes front door: tokens for kubectl and the kubeconfig.

``bastion token`` finds the caller's OIDC token in this order: ``--token-file``,
``$GUARITA_TOKEN``, ``$GUARITA_TOKEN_FILE`` (a CI job's OIDC token, a projected
service-account token), or a client-credentials grant (``GUARITA_CLIENT_ID``,
``GUARITA_CLIENT_SECRET``, ``GUARITA_ISSUER``; optional ``GUARITA_SCOPE``,
``GUARITA_RESOURCE``) whose token is cached in ``~/.cache/guarita/token.json`` (mode
0600) until shortly before it expires. ``--exec-credential`` wraps it in the
ExecCredential that kubectl's credential plugin protocol expects.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from recorder.secretfile import write_secret

EXEC_API = "client.authentication.k8s.io/v1"
REFRESH_MARGIN = 60.0  # seconds before expiry when a cached token is no longer handed out


class TokenError(Exception):
    """No token could be obtained; the message says what to set."""


def jwt_expiry(token: str) -> float | None:
    """The ``exp`` claim of a JWT, read without verification (only to know when to refresh)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        exp = payload.get("exp")
    except (ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def cache_path() -> Path:
    if os.environ.get("GUARITA_TOKEN_CACHE"):
        return Path(os.environ["GUARITA_TOKEN_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "guarita" / "token.json"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("tokens"), dict) else {}


def _write_private(path: Path, text: str) -> None:
    write_secret(path, text.encode(), replace=True)


def _http_json(url: str, data: dict[str, str] | None = None, auth: tuple[str, str] | None = None) -> dict[str, Any]:
    body = urllib.parse.urlencode(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Accept": "application/json"})
    if auth:
        user, secret = (urllib.parse.quote(s, safe="") for s in auth)  # RFC 6749 §2.3.1
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            doc = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        detail = exc.read()[:300].decode(errors="replace")
        raise TokenError(f"{url}: HTTP {exc.code} {detail}".strip()) from None
    except (urllib.error.URLError, OSError) as exc:
        raise TokenError(f"cannot reach {url}: {getattr(exc, 'reason', exc)}") from None
    except ValueError:
        raise TokenError(f"{url}: the answer is not JSON") from None
    if not isinstance(doc, dict):
        raise TokenError(f"{url}: the answer is not a JSON object")
    return doc


def client_credentials_token(env: dict[str, str] | None = None) -> str | None:
    """A token from a client-credentials grant, cached on disk; None when not configured."""
    env = dict(os.environ if env is None else env)
    client_id, secret, issuer = env.get("GUARITA_CLIENT_ID"), env.get("GUARITA_CLIENT_SECRET"), env.get("GUARITA_ISSUER")
    if not (client_id and secret and issuer):
        if client_id or secret:
            raise TokenError("a client-credentials grant needs GUARITA_CLIENT_ID, GUARITA_CLIENT_SECRET and "
                             "GUARITA_ISSUER")
        return None
    scope, resource = env.get("GUARITA_SCOPE") or "", env.get("GUARITA_RESOURCE") or ""
    key = hashlib.sha256("\0".join((issuer.rstrip("/"), client_id, scope, resource)).encode()).hexdigest()[:24]
    path = cache_path()
    cache = _read_cache(path)
    entry = cache.get("tokens", {}).get(key)
    now = time.time()
    if isinstance(entry, dict) and isinstance(entry.get("token"), str):
        expires, issued = float(entry.get("expires_at") or 0), float(entry.get("issued_at") or 0)
        margin = min(REFRESH_MARGIN, max(0.0, (expires - issued) * 0.1))
        if expires - margin > now:
            return entry["token"]
    discovery = _http_json(issuer.rstrip("/") + "/.well-known/openid-configuration")
    endpoint = discovery.get("token_endpoint")
    if not isinstance(endpoint, str):
        raise TokenError(f"{issuer}: discovery has no token_endpoint")
    form = {"grant_type": "client_credentials"}
    if scope:
        form["scope"] = scope
    if resource:
        form["resource"] = resource
    answer = _http_json(endpoint, form, auth=(client_id, secret))
    token = answer.get("access_token")
    if not isinstance(token, str) or not token:
        raise TokenError(f"{endpoint}: no access_token in the answer")
    expires = jwt_expiry(token) or now + float(answer.get("expires_in") or 300)
    cache.setdefault("tokens", {})
    cache["tokens"] = {k: v for k, v in cache["tokens"].items()
                       if isinstance(v, dict) and float(v.get("expires_at") or 0) > now}
    cache["tokens"][key] = {"token": token, "expires_at": expires, "issued_at": now, "issuer": issuer,
                            "client_id": client_id}
    _write_private(path, json.dumps(cache))
    return token


def exec_credential(token: str) -> dict[str, Any]:
    api = EXEC_API
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        info = json.loads(os.environ.get("KUBERNETES_EXEC_INFO") or "{}")
        api = info.get("apiVersion") or api
    status: dict[str, Any] = {"token": token}
    exp = jwt_expiry(token)
    if exp is not None:
        status["expirationTimestamp"] = datetime.fromtimestamp(exp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"apiVersion": api, "kind": "ExecCredential", "spec": {"interactive": False}, "status": status}


def default_kubeconfig_path() -> Path:
    env = os.environ.get("KUBECONFIG")
    if env:
        first = next((p for p in env.split(os.pathsep) if p), None)
        if first:
            return Path(first).expanduser()
    return Path.home() / ".kube" / "config"


def build_entries(cluster: str, server: str, ca_pem: bytes, command: list[str], context: str,
                  namespace: str | None = None, token_file: str | None = None) -> dict[str, Any]:
    args = [*command[1:], "token", "--exec-credential"]
    if token_file:
        args += ["--token-file", token_file]
    ctx: dict[str, Any] = {"cluster": context, "user": context}
    if namespace:
        ctx["namespace"] = namespace
    return {
        "cluster": {"name": context, "cluster": {
            "server": server.rstrip("/") + f"/clusters/{cluster}",
            "certificate-authority-data": base64.b64encode(ca_pem).decode()}},
        "user": {"name": context, "user": {"exec": {
            "apiVersion": EXEC_API, "command": command[0], "args": args, "interactiveMode": "IfAvailable",
            "provideClusterInfo": False,
            "installHint": "bastion comes with guarita: pip install guarita (it prints your OIDC token)"}}},
        "context": {"name": context, "context": ctx},
    }


def merge_kubeconfig(path: Path, entries: dict[str, Any], switch: bool = True) -> None:
    """Add or replace the cluster, user and context entries in a kubeconfig (0600)."""
    doc: dict[str, Any] = {}
    if path.exists():
        loaded = yaml.safe_load(path.read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path} is not a kubeconfig (expected a mapping)")
        doc = loaded or {}
    doc.setdefault("apiVersion", "v1")
    doc.setdefault("kind", "Config")
    doc.setdefault("preferences", {})
    for section, key in (("clusters", "cluster"), ("users", "user"), ("contexts", "context")):
        items = [i for i in doc.get(section) or [] if not (isinstance(i, dict) and i.get("name") == entries[key]["name"])]
        items.append(entries[key])
        doc[section] = items
    if switch or not doc.get("current-context"):
        doc["current-context"] = entries["context"]["name"]
    _write_private(path, yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
