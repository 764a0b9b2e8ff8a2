"""``bastion serve --dev`` only: the local issuer's sign-in page for demo identities.

It is a real (tiny) authorization server: ``/dev/authorize`` shows the page and answers with a
one-time code bound to the PKCE challenge, ``/dev/oauth/token`` trades it for an access token
the dev issuer signs. So the console signs in the same way against it as against any issuer.
Loopback callers only, like ``/dev/token``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from urllib.parse import urlencode, urlsplit

from aiohttp import web

from bastion.config import is_loopback
from bastion.console.render import e, page
from bastion.console.settings import DEV_CLIENT_ID
from bastion.http.api import GATEWAY_KEY

if TYPE_CHECKING:
    from bastion.services import Services



def demo_identities() -> list[tuple[str, tuple[str, ...], str]]:
    """(subject, groups, what it can do): the --dev identities of `bastion dev-token`, and alice
    (group sre) who holds every console role."""
    from bastion.devmode import DEV_IDENTITIES

    return [("alice", ("sre",), "approver, operator and auditor: everything the console shows"),
            *((i.name, i.groups, i.does + ("; no console role (403)" if i.name == "agent" else ""))
              for i in DEV_IDENTITIES.values())]


PARAMS = ("client_id", "redirect_uri", "state", "code_challenge", "code_challenge_method", "scope", "nonce")


def _gw(request: web.Request) -> Services:
    return request.app[GATEWAY_KEY]  # type: ignore[return-value]


def _refuse(request: web.Request) -> web.Response | None:
    if not is_loopback(request.remote or ""):
        return web.Response(status=403, text="the dev issuer signs in loopback callers only")
    return None


def _check(params: dict[str, str]) -> str | None:
    if params.get("client_id") != DEV_CLIENT_ID:
        return f"unknown client_id (the dev issuer knows {DEV_CLIENT_ID!r})"
    uri = urlsplit(params.get("redirect_uri", ""))
    if uri.scheme not in ("http", "https") or not is_loopback(uri.hostname or "") or uri.path != "/console/callback":
        return "redirect_uri must be a loopback /console/callback"
    if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
        return "PKCE is required: code_challenge with code_challenge_method=S256"
    return None


async def authorize(request: web.Request) -> web.Response:
    if (refused := _refuse(request)) is not None:
        return refused
    source = await request.post() if request.method == "POST" else request.query
    params = {k: str(source.get(k) or "") for k in PARAMS}
    if (problem := _check(params)) is not None:
        return page("Sign-in refused", f'<p class="error" role="alert">{e(problem)}</p>', status=400)
    if request.method == "POST":
        sub = str(source.get("sub") or "").strip()
        groups = [g.strip() for g in str(source.get("groups") or "").split(",") if g.strip()]
        if not sub:
            return page("Sign-in refused", '<p class="error" role="alert">choose an identity</p>', status=400)
        code = _gw(request).dev_issuer.issue_code(  # type: ignore[union-attr]
            {"sub": sub, "groups": groups, "email": f"{sub}@example.com"}, params["client_id"],
            params["redirect_uri"], params["code_challenge"])
        back = {"code": code, "state": params["state"]}
        raise web.HTTPSeeOther(params["redirect_uri"] + "?" + urlencode(back))
    hidden = "".join(f'<input type="hidden" name="{k}" value="{e(v)}">' for k, v in params.items())
    choices = "".join(
        f'<form method="post" class="identity">{hidden}<input type="hidden" name="sub" value="{e(sub)}">'
        f'<input type="hidden" name="groups" value="{e(",".join(groups))}">'
        f'<button type="submit" id="as-{e(sub)}">Sign in as {e(sub)}</button> '
        f'<small>groups: {e(", ".join(groups) or "none")} · {e(what)}</small></form>'
        for sub, groups, what in demo_identities())
    custom = (f'<form method="post" class="identity custom">{hidden}'
              '<label>subject <input name="sub" required></label> '
              '<label>groups <input name="groups" placeholder="sre, approvers"></label> '
              '<button type="submit">Sign in</button></form>')
    body = ('<p class="note">The local development issuer of <code>bastion serve --dev</code>: pick a demo '
            'identity (no password). A real deployment signs in with its OIDC provider.</p>' + choices
            + '<h2>Any identity</h2>' + custom)
    return page("Dev sign-in", body)


async def token(request: web.Request) -> web.Response:
    if (refused := _refuse(request)) is not None:
        return refused
    form = await request.post()
    if form.get("grant_type") != "authorization_code":
        return web.json_response({"error": "unsupported_grant_type"}, status=400)
    try:
        access = _gw(request).dev_issuer.redeem(  # type: ignore[union-attr]
            str(form.get("code") or ""), str(form.get("client_id") or ""), str(form.get("redirect_uri") or ""),
            str(form.get("code_verifier") or ""))
    except ValueError as exc:
        return web.json_response({"error": "invalid_grant", "error_description": str(exc)}, status=400)
    return web.json_response({"access_token": access, "token_type": "Bearer", "expires_in": 3600},
                             headers={"Cache-Control": "no-store"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/dev/authorize", authorize)
    app.router.add_post("/dev/authorize", authorize)
    app.router.add_post("/dev/oauth/token", token)
