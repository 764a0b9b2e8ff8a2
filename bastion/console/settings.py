"""``[console]``: the OIDC client the console signs people in with (authorization code + PKCE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

DEV_CLIENT_ID = "guarita-console"
DEFAULT_SCOPES = ("openid", "email", "profile")


@dataclass(frozen=True)
class ConsoleConfig:
    # The public client registered at the issuer (no secret: PKCE protects the code).
    client_id: str
    # Which [[oidc]] issuer signs people in; None: the first one.
    issuer: str | None = None
    # The public base URL of the HTTP API (redirect URI, links in webhooks); None: from the request.
    url: str | None = None
    scopes: tuple[str, ...] = DEFAULT_SCOPES


def parse_console(table: Any, issuers: tuple[str, ...]) -> tuple[ConsoleConfig | None, list[tuple[str, str]]]:
    """Parse ``[console]`` (None when absent); problems as ``(key, message)`` pairs."""
    if table is None:
        return None, []
    p = "console."
    if not isinstance(table, dict):
        return None, [("console", "must be a table")]
    problems: list[tuple[str, str]] = []
    known = {"client_id", "issuer", "url", "scopes"}
    problems += [(p + k, f"unknown key (known: {', '.join(sorted(known))})") for k in table if k not in known]
    client_id = table.get("client_id")
    if not isinstance(client_id, str) or not client_id.strip():
        problems.append((p + "client_id", "is required: the public client (authorization code + PKCE) registered "
                                          "at the issuer for the console"))
        client_id = ""
    issuer = table.get("issuer")
    if issuer is not None and (not isinstance(issuer, str) or issuer.rstrip("/") not in
                               {i.rstrip("/") for i in issuers}):
        problems.append((p + "issuer", f"must be one of the [[oidc]] issuers ({', '.join(issuers) or 'none'})"))
        issuer = None
    url = table.get("url")
    if url is not None and (not isinstance(url, str) or not url.startswith(("https://", "http://"))):
        problems.append((p + "url", "must be the http(s):// base URL people open, e.g. https://bastion.example.com"))
        url = None
    scopes = table.get("scopes", list(DEFAULT_SCOPES))
    if not isinstance(scopes, list) or not all(isinstance(s, str) for s in scopes) or "openid" not in scopes:
        problems.append((p + "scopes", "must be a list of strings that includes \"openid\""))
        scopes = list(DEFAULT_SCOPES)
    return ConsoleConfig(client_id=client_id, issuer=issuer, url=url.rstrip("/") if url else None,
                         scopes=tuple(scopes)), problems


def console_settings(config: Any) -> ConsoleConfig | None:
    """The console's settings: ``[console]``, or in --dev the local issuer's built-in client."""
    found = getattr(config, "console", None)
    if found is not None:
        return found  # type: ignore[no-any-return]
    return ConsoleConfig(client_id=DEV_CLIENT_ID) if config.dev else None


def request_link(config: Any, request_id: str) -> str | None:
    """The console page of an approval request, for webhooks: from ``console.url``, or in
    --dev the loopback HTTP API; None when the console has no known address."""
    settings = console_settings(config)
    if settings is None:
        return None
    base = settings.url
    if base is None and config.dev:
        host, port = config.http_listen
        base = f"http://{host}:{port}"
    return f"{base}/console/approvals/{request_id}" if base else None
