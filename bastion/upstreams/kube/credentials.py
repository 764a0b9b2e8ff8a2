"""The gateway's own credentials for a cluster, from a kubeconfig, through kubernetes-asyncio's
config loader: what a managed cluster hands out works as it does for kubectl.

* a bearer ``token`` or ``tokenFile``, a client certificate (files or inline data);
* an ``exec`` credential plugin (EKS ``aws eks get-token``, GKE ``gke-gcloud-auth-plugin``,
  AKS ``kubelogin``...): run when the credentials are first needed and again when the
  ExecCredential's ``expirationTimestamp`` comes near (or every ``EXEC_TTL`` when it gives
  none), never per request;
* an ``oidc`` auth-provider (its id-token, refreshed with its refresh-token when it expires).

The loader reads the file; this module turns what it found into :class:`Loaded` (server,
TLS context, token, when to load again) and names the kubeconfig in every error. Files the
kubeconfig points to are watched by bastion/upstreams/kube/upstream.py as before.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config.config_exception import ConfigException
from kubernetes_asyncio.config.kube_config import KubeConfigLoader

log = logging.getLogger("guarita.kube")

# An exec plugin's token without expirationTimestamp is asked for again after this long.
EXEC_TTL = 300.0
# Credentials that expire are loaded again this long before they do.
EXPIRY_SKEW = 30.0
# Keys of a kubeconfig that name files (watched: a rotated file is read again).
FILE_KEYS = ("certificate-authority", "client-certificate", "client-key", "tokenFile")


class KubeconfigError(Exception):
    """The kubeconfig cannot give the gateway credentials; the message says why."""


@dataclass(frozen=True)
class Loaded:
    server: str
    ssl: ssl.SSLContext
    token: str | None
    server_hostname: str | None
    watched: list[Path]
    # time.time() after which the credentials must be loaded again (exec plugin, OIDC), or None.
    expires: float | None


async def load(path: Path, context: str | None) -> Loaded:
    """Load the credentials of ``context`` (or the current context) of the kubeconfig ``path``."""
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise KubeconfigError(f"cannot read kubeconfig {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise KubeconfigError(f"kubeconfig {path} is not valid YAML: {exc}") from None
    if not isinstance(doc, dict):
        raise KubeconfigError(f"kubeconfig {path} is not a kubeconfig (expected a mapping)")
    if not (context or doc.get("current-context")):
        raise KubeconfigError(f"kubeconfig {path} has no current-context: set context = NAME for the cluster")
    user = _user_of(doc, context)
    if user.get("username") or user.get("password"):
        raise KubeconfigError(f"kubeconfig {path}: the user has a username/password (basic authentication, "
                              "removed from Kubernetes); give the gateway a token, a client certificate, an exec "
                              "plugin or an oidc auth-provider")
    provider = (user.get("auth-provider") or {}).get("name") if isinstance(user.get("auth-provider"), dict) else None
    if provider not in (None, "oidc"):
        raise KubeconfigError(f"kubeconfig {path}: auth-provider {provider!r} is not supported (use its exec "
                              "plugin instead, e.g. gke-gcloud-auth-plugin or kubelogin)")
    config = Configuration()
    try:
        loader = KubeConfigLoader(doc, active_context=context, config_base_path=str(path.parent))
        await loader.load_and_set(config)
    except (ConfigException, KeyError, ValueError, TypeError, OSError) as exc:
        if user.get("exec"):
            raise KubeconfigError(f"kubeconfig {path}: the exec credential plugin {_exec_command(user)!r} failed: "
                                  f"{_one_line(exc)}") from None
        raise KubeconfigError(f"kubeconfig {path}: {_one_line(exc)}") from None
    server = str(config.host or "").rstrip("/")
    if not server.startswith("https://"):
        raise KubeconfigError(f"kubeconfig {path}: cluster server must be an https:// URL, got {server!r}")
    bearer = str(config.api_key.get("BearerToken") or "")
    token = bearer.removeprefix("Bearer ").strip() or None
    if user.get("exec") and token is None and not config.cert_file:
        raise KubeconfigError(f"kubeconfig {path}: the exec credential plugin {_exec_command(user)!r} gave no token "
                              "or client certificate (the gateway's log has its error)")
    if not config.verify_ssl:
        log.warning("kubeconfig %s: insecure-skip-tls-verify is set: the API server's identity is NOT checked", path)
    try:
        context_ = _ssl_context(config)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise KubeconfigError(f"kubeconfig {path}: cannot load the CA or client certificate: {exc}") from None
    return Loaded(server, context_, token, str(config.tls_server_name) if config.tls_server_name else None,
                  _watched(path, doc), _expires(loader, user, token))


def _user_of(doc: dict[str, Any], context: str | None) -> dict[str, Any]:
    name = context or doc.get("current-context")
    for ctx in doc.get("contexts") or []:
        if isinstance(ctx, dict) and ctx.get("name") == name and isinstance(ctx.get("context"), dict):
            user_name = ctx["context"].get("user")
            for user in doc.get("users") or []:
                if isinstance(user, dict) and user.get("name") == user_name and isinstance(user.get("user"), dict):
                    return dict(user["user"])
    return {}


def _exec_command(user: dict[str, Any]) -> str:
    spec = user.get("exec") or {}
    return " ".join([str(spec.get("command") or "?"), *(str(a) for a in spec.get("args") or [])])


def _expires(loader: KubeConfigLoader, user: dict[str, Any], token: str | None) -> float | None:
    if user.get("exec"):
        expiry = getattr(loader, "exec_plugin_expiry", None)
        if isinstance(expiry, dt.datetime):
            return expiry.timestamp() - EXPIRY_SKEW
        return time.time() + EXEC_TTL
    if user.get("auth-provider") and token:
        exp = _jwt_exp(token)
        return exp - EXPIRY_SKEW if exp is not None else time.time() + EXEC_TTL
    return None


def _jwt_exp(token: str) -> float | None:
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return float(claims["exp"])
    except (ValueError, KeyError, TypeError):
        return None


def _ssl_context(config: Configuration) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if not config.verify_ssl:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    elif config.ssl_ca_cert:
        context.load_verify_locations(cafile=str(config.ssl_ca_cert))
    if config.cert_file and config.key_file:
        context.load_cert_chain(str(config.cert_file), str(config.key_file))
    elif bool(config.cert_file) != bool(config.key_file):
        raise ValueError("a client certificate needs its key (and the other way round)")
    return context


def _watched(path: Path, doc: dict[str, Any]) -> list[Path]:
    out = [path]
    for section, inner in (("clusters", "cluster"), ("users", "user")):
        for item in doc.get(section) or []:
            body = item.get(inner) if isinstance(item, dict) else None
            for key in FILE_KEYS:
                value = body.get(key) if isinstance(body, dict) else None
                if value:
                    p = Path(str(value)).expanduser()
                    out.append(p if p.is_absolute() else path.parent / p)
    return out


def _one_line(exc: BaseException) -> str:
    return " ".join((str(exc) or type(exc).__name__).split())[:300]
