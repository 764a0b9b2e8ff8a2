"""What every console page shares: its services, the sign-in and role check, the player assets."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING

from aiohttp import web

from bastion.console.auth import OidcClient, Viewer, clear_session, csrf_ok, viewer_of
from bastion.console.feed import Feed
from bastion.console.recordings import Recordings
from bastion.console.render import problem
from bastion.console.settings import console_settings
from bastion.http.api import GATEWAY_KEY

if TYPE_CHECKING:
    from bastion.services import Services

STATIC = Path(__file__).resolve().parent / "static"
CONSOLE_KEY = web.AppKey("console", object)
Page = Callable[[web.Request, Viewer], Awaitable[web.StreamResponse]]
STREAMS = ("/events", "/stream")


class Console:
    """The services the pages use, made once per HTTP app."""

    def __init__(self, gw: Services) -> None:
        self.gw = gw
        self.oidc = OidcClient(gw)
        self.feed = Feed(gw.state)
        self.recordings = Recordings(gw.store, (gw.recording_key.public_raw,))


def gw_of(request: web.Request) -> Services:
    return request.app[GATEWAY_KEY]  # type: ignore[return-value]


def console_of(request: web.Request) -> Console:
    return request.app[CONSOLE_KEY]  # type: ignore[return-value]


def guarded(*roles: str) -> Callable[[Page], Callable[[web.Request], Awaitable[web.StreamResponse]]]:
    """Sign-in, then one of ``roles`` (none given: any console role), then CSRF on POST."""

    def decorate(handler: Page) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def wrapper(request: web.Request) -> web.StreamResponse:
            gw = gw_of(request)
            found = await viewer_of(gw, request)
            if not isinstance(found, Viewer):
                return sign_in_again(gw, request, found is not None)
            if not found.roles or (roles and not found.has(*roles)):  # type: ignore[arg-type]
                gw.audit.emit("api.forbidden", subject=found.identity.subject, issuer=found.identity.issuer,
                              action=f"console {request.method} {request.path}", needs=list(roles) or ["any"])
                needs = " or ".join(roles) if roles else "approver, operator or auditor"
                return problem(403, "Forbidden", f"{found.identity.display} may not open this page: it takes the "
                               f"{needs} role (agents' identities have no console)", found)
            if request.method == "POST":
                form = await request.post()
                settings = console_settings(gw.config)
                if not csrf_ok(found, request, form, settings.url if settings else None):
                    gw.audit.emit("console.csrf_refused", subject=found.identity.subject, path=request.path,
                                  source=request.remote)
                    return problem(403, "Refused", "the form's CSRF token is missing or wrong (a page from another "
                                   "site, or an old page): reload the page and try again", found, back="/console/")
                request["form"] = form
            return await handler(request, found)

        return wrapper

    return decorate


def sign_in_again(gw: Services, request: web.Request, refused: bool) -> web.StreamResponse:
    # Only a page the person navigates to is sent to the issuer; a page's own background
    # request (a live refresh, a stream) gets 401 and the page reloads itself.
    background = request.headers.get("Sec-Fetch-Mode", "navigate") != "navigate"
    if request.method != "GET" or request.path.endswith(STREAMS) or background or request.query.get("fragment"):
        response: web.StreamResponse = problem(401, "Signed out", "your console session has ended (or its cookie "
                                               "was not accepted): sign in again", back="/console/login")
    else:
        response = web.HTTPSeeOther("/console/login?" + _query({"next": request.path_qs,
                                                                "expired": "1" if refused else ""}))
    if refused:
        clear_session(gw, response)
    return response


def _query(values: dict[str, str]) -> str:
    from urllib.parse import urlencode

    return urlencode({k: v for k, v in values.items() if v})


def json_html(text: str) -> str:
    """JSON inside <script type="application/json">: no "</" can close the element early."""
    return text.replace("</", "<\\/").replace("<!--", "<\\!--")


PLAYER_HEAD = '<link rel="stylesheet" href="/console/static/asciinema-player.css">'
PLAYER_SCRIPTS = ('<script src="/console/static/asciinema-player.min.js"></script>'
                  '<script src="/console/static/player.js"></script>')
