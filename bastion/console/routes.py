"""The console's pages and actions under /console/ (docs/console.md).

Every page checks the session cookie (bastion/console/auth.py), then the role the page
needs; every POST checks the CSRF token. The data comes from the services the HTTP API uses
(the approval engine, the state store, Control, the recording store): no copy of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bastion.console import approvals_page, recordings_page, render
from bastion.console.auth import (
    SignInError,
    Viewer,
    clear_session,
    login_cookie,
    login_cookie_name,
    safe_next,
    session_cookie,
    viewer_of,
)
from bastion.console.guard import (
    CONSOLE_KEY,
    PLAYER_HEAD,
    PLAYER_SCRIPTS,
    STATIC,
    Console,
    console_of,
    guarded,
    gw_of,
    json_html,
)
from bastion.console.render import age, csrf_field, e, page, problem, table
from recorder.units import human_size

if TYPE_CHECKING:
    from bastion.services import Services

# -- signing in and out ------------------------------------------------------------------------


@guarded()
async def home(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """Approvers start at the approvals, operators and auditors at the live sessions."""
    raise web.HTTPSeeOther("/console/approvals" if viewer.has("approver") else "/console/sessions")


async def login(request: web.Request) -> web.StreamResponse:
    gw, console = gw_of(request), console_of(request)
    next_path = safe_next(request.query.get("next"))
    try:
        url, value, state = await console.oidc.begin(request, next_path)
    except SignInError as exc:
        return problem(503, "Cannot sign in", str(exc))
    response = web.HTTPSeeOther(url)
    login_cookie(gw, response, state, value)
    return response


async def callback(request: web.Request) -> web.StreamResponse:
    gw, console = gw_of(request), console_of(request)
    state = request.query.get("state", "")
    try:
        token, identity, next_path = await console.oidc.finish(request, request.cookies.get(
            login_cookie_name(gw.config.dev, state)))
    except SignInError as exc:
        gw.audit.emit("auth.failure", method="console", source=request.remote, path=request.path,
                      reason="console_sign_in", detail=str(exc))
        return problem(400, "Sign-in failed", str(exc), back="/console/login")
    gw.audit.emit("console.signed_in", subject=identity.subject, issuer=identity.issuer, source=request.remote)
    response = web.HTTPSeeOther(safe_next(next_path))
    session_cookie(gw, response, token, identity, state)
    return response


@guarded()
async def logout(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    gw = gw_of(request)
    gw.audit.emit("console.signed_out", subject=viewer.identity.subject, issuer=viewer.identity.issuer)
    response = web.HTTPSeeOther("/console/signed-out")
    clear_session(gw, response)
    return response


async def signed_out(request: web.Request) -> web.StreamResponse:
    return page("Signed out", '<p>You are signed out of the console.</p><p><a href="/console/login">Sign in '
                'again</a></p>')


# -- approvals ---------------------------------------------------------------------------------


async def _visible_requests(gw: Services, viewer: Viewer) -> list[dict[str, Any]]:
    """Every pending request (however many were decided since), then the latest decided ones."""
    pending = await gw.state.list_requests(status="pending", limit=1000)
    recent = await gw.state.list_requests(limit=200)
    seen = {r["id"] for r in pending}
    rows = pending + [r for r in recent if r["id"] not in seen]
    return [r for r in rows if gw.approvals.may_view(r, viewer.identity)]


@guarded()
async def approvals(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    gw = gw_of(request)
    body = approvals_page.listing(await _visible_requests(gw, viewer), viewer, gw.approvals)
    if request.query.get("fragment"):
        return render.fragment(body)
    intro = ('<p class="intro">Requests you may decide or made. The list updates by itself; '
             'nobody decides on their own request.</p>')
    return page("Approvals", intro + render.live(body), viewer, current="approvals", live="approvals")


@guarded()
async def approval(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    gw = gw_of(request)
    rid = request.match_info["id"]
    row = await gw.state.get_request(rid)
    if row is None:
        return problem(404, "Not found", f"no approval request {rid!r}", viewer, back="/console/approvals")
    if not gw.approvals.may_view(row, viewer.identity):
        return problem(403, "Forbidden", f"{viewer.identity.display} is neither the requester nor in an approver "
                       f"group of request {rid}", viewer, back="/console/approvals")
    body = approvals_page.card(row, viewer, gw.approvals, back=f"/console/approvals/{rid}")
    if request.query.get("fragment"):
        return render.fragment(body)
    return page(f"Request {rid}", render.live(body) + '<p><a href="/console/approvals">all requests</a></p>',
                viewer, current="approvals", live="approvals")


@guarded()
async def decide(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    from bastion.approvals.engine import DecisionError

    gw = gw_of(request)
    rid = request.match_info["id"]
    form = request["form"]
    decision = str(form.get("decision") or "")
    if decision not in ("approve", "deny"):
        return problem(400, "Bad request", "choose Approve or Deny", viewer, back=f"/console/approvals/{rid}")
    try:
        await gw.approvals.decide(rid, viewer.identity, decision, str(form.get("reason") or ""))
    except DecisionError as exc:
        return problem(exc.status, "Not decided", str(exc), viewer, back=f"/console/approvals/{rid}")
    raise web.HTTPSeeOther(safe_next(str(form.get("back") or f"/console/approvals/{rid}")))


async def events(request: web.Request) -> web.StreamResponse:
    """Server-sent events: ``approvals`` / ``sessions`` when they change; ``expired`` when the
    session token runs out (the page then reloads into the sign-in)."""
    gw, console = gw_of(request), console_of(request)
    found = await viewer_of(gw, request)
    if not isinstance(found, Viewer) or not found.roles:
        return web.Response(status=401 if not isinstance(found, Viewer) else 403, text="sign in to the console")
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store",
                                           "X-Accel-Buffering": "no"})
    await response.prepare(request)
    await response.write(b"retry: 1000\nevent: hello\ndata: {}\n\n")
    with contextlib.suppress(ConnectionResetError):  # the page went away
        await _follow(gw, console, found, response)
    return response


async def _follow(gw: Services, console: Console, found: Viewer, response: web.StreamResponse) -> None:
    ends = found.identity.expires_at or (time.time() + 3600)
    pinged = time.monotonic()
    async with console.feed.listen() as queue:
        # Wakes at least once a second, so a stopping gateway is not held up by open pages.
        while not gw.stopping.is_set():
            left = ends - time.time()
            if left <= 0:
                await response.write(b"event: expired\ndata: {}\n\n")
                break
            try:
                topic = await asyncio.wait_for(queue.get(), timeout=min(1.0, left))
            except TimeoutError:
                if time.monotonic() - pinged > 15:
                    await response.write(b": keep-alive\n\n")
                    pinged = time.monotonic()
                continue
            await response.write(f"event: {topic}\ndata: {console.feed.versions[topic]}\n\n".encode())


# -- live sessions -----------------------------------------------------------------------------


@guarded("operator", "auditor")
async def sessions(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    gw = gw_of(request)
    rows = await gw.state.live_sessions_overview()
    operator = viewer.has("operator")
    body = []
    for s in rows:
        ident = s.get("identity") or {}
        where = f"{s.get('login')}@{s.get('target')}" if s.get("login") else str(s.get("target") or "?")
        actions = f'<a href="/console/sessions/{e(s["id"])}/watch" class="button">watch</a>'
        if operator:
            actions += (f'<form method="post" action="/console/sessions/{e(s["id"])}/kill" class="inline kill">'
                        f'{csrf_field(viewer)}<input name="reason" required placeholder="reason" aria-label="reason">'
                        f'<button class="deny">kill</button></form>'
                        f'<form method="post" action="/console/sessions/{e(s["id"])}/lock" class="inline lock">'
                        f'{csrf_field(viewer)}<input name="reason" required placeholder="reason" aria-label="reason">'
                        f'<button class="deny">lock {e(s.get("subject"))}</button></form>')
        body.append([f'<code>{e(s["id"])}</code>', e(ident.get("email") or s.get("subject")),
                     e(where) + f' <small>{e(s.get("front_door"))} {e(s.get("kind"))}</small>',
                     f'<code>{e((s.get("command") or "")[:80])}</code>', age(s.get("started")),
                     f'{human_size(s.get("bytes_in"))} in / {human_size(s.get("bytes_out"))} out',
                     e(s.get("replica_name") or s.get("replica_id") or ""),
                     str(s.get("pending_approvals", 0)), actions])
    listing = table(["session", "who", "where", "command", "since", "bytes", "replica", "waiting", ""], body,
                    "No live sessions.", "sessions")
    if request.query.get("fragment"):
        return render.fragment(listing)
    note = "" if operator else '<p class="note">Killing and locking take the operator role.</p>'
    return page("Live sessions", note + render.live(listing), viewer, current="sessions",
                live="sessions")


@guarded("operator")
async def kill(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    from bastion.control import LockError
    from bastion.state import NotFound

    gw = gw_of(request)
    sid = request.match_info["id"]
    try:
        await gw.control.kill(sid, viewer.identity, str(request["form"].get("reason") or ""))
    except LockError as exc:
        return problem(400, "Not killed", str(exc), viewer, back="/console/sessions")
    except NotFound as exc:
        return problem(404, "Not killed", str(exc), viewer, back="/console/sessions")
    raise web.HTTPSeeOther("/console/sessions")


@guarded("operator")
async def lock_subject(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    from bastion.control import LockError
    from bastion.state import StateError

    gw = gw_of(request)
    sid = request.match_info["id"]
    row = await gw.state.get_live_session(sid)
    if row is None:
        return problem(404, "Not locked", f"no live session {sid!r}", viewer, back="/console/sessions")
    try:
        await gw.control.create_lock("subject", str(row["subject"]), str(request["form"].get("reason") or ""),
                                     viewer.identity)
    except LockError as exc:
        return problem(400, "Not locked", str(exc), viewer, back="/console/sessions")
    except StateError as exc:
        return problem(503, "Not locked", f"the lock was not stored: {exc}", viewer, back="/console/sessions")
    raise web.HTTPSeeOther("/console/sessions")


async def _may_watch(gw: Services, viewer: Viewer, sid: str) -> bool:
    if viewer.has("operator", "auditor"):
        return True
    requests = await gw.state.list_requests(session_id=sid, limit=50)
    return any(r["status"] == "pending" and gw.approvals._is_approver(r, viewer.identity)  # noqa: SLF001
               for r in requests)


@guarded()
async def watch(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    gw = gw_of(request)
    sid = request.match_info["id"]
    if not await _may_watch(gw, viewer, sid):
        return problem(403, "Forbidden", "watching a session takes the operator or auditor role, or a pending "
                       "request of that session you may decide", viewer)
    config = json.dumps({"stream": f"/console/sessions/{sid}/stream", "speed": 1})
    body = (f'<p>Session <code>{e(sid)}</code>, as its recording reaches the store (a few seconds behind). '
            f'<a href="/console/recordings/{e(sid)}">recording</a></p>'
            f'<div id="player" class="player"></div>'
            f'<script type="application/json" id="player-config">{json_html(config)}</script>')
    return page("Watch live", body, viewer, current="sessions", head=PLAYER_HEAD, scripts=PLAYER_SCRIPTS)


@guarded()
async def stream(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    """The session's output for asciinema-player's ``eventsource`` driver: a reset carrying
    what was printed so far, then each new event as its segment reaches the store."""
    from replay.reader import ReplayError

    gw, console = gw_of(request), console_of(request)
    sid = request.match_info["id"]
    if not await _may_watch(gw, viewer, sid):
        return web.Response(status=403, text="forbidden")
    try:
        summary = await console.recordings.run(console.recordings.open, sid)
    except ReplayError as exc:
        return web.Response(status=404, text=str(exc))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"})
    await response.prepare(request)
    with contextlib.suppress(ConnectionResetError):  # the page went away
        await _follow_recording(gw, console.recordings.store, summary, response)
    return response


INIT_LIMIT = 256 * 1024  # what a late watcher gets of the output so far (the screen needs far less)


async def _follow_recording(gw: Services, store: Any, summary: Any, response: web.StreamResponse) -> None:
    import codecs

    from recorder.segment import SegmentError, parse_segment
    from recorder.store import NotFound, session_prefix

    prefix = session_prefix(summary.id)
    term = summary.meta.get("term") or {}
    cols, rows = int(term.get("cols") or 80), int(term.get("rows") or 24)
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a character may span two events
    index, sent_reset, last_t = 0, False, 0.0
    init: list[str] = []
    held = 0
    while not gw.stopping.is_set():
        key = f"{prefix}seg-{index:06d}.zst"
        try:
            data = await asyncio.to_thread(store.get, key)
        except NotFound:
            if not sent_reset:
                await _sse(response, {"cols": cols, "rows": rows, "time": last_t, "init": "".join(init)[-INIT_LIMIT:]})
                sent_reset = True
            with contextlib.suppress(NotFound):
                await asyncio.to_thread(store.get, prefix + "manifest.json")
                await _sse(response, {"state": "offline"})
                return
            await asyncio.sleep(0.5)
            continue
        try:
            _, seg_events = parse_segment(data, key)
        except SegmentError:
            await _sse(response, {"state": "offline"})  # the recording page says what is wrong with it
            return
        for event in seg_events:
            if event.stream not in ("o", "e"):
                continue
            text = decoder.decode(event.stream_bytes() or b"")
            last_t = event.t
            if sent_reset:
                await _sse(response, [event.t, "o", text])
            else:
                init.append(text)
                held += len(text)
                if held > 4 * INIT_LIMIT:  # keep the tail only: memory stays flat for long sessions
                    init, held = ["".join(init)[-INIT_LIMIT:]], INIT_LIMIT
        index += 1


async def _sse(response: web.StreamResponse, data: Any) -> None:
    await response.write(f"data: {json.dumps(data)}\n\n".encode())


def add_routes(app: web.Application, gw: Services) -> None:
    app[CONSOLE_KEY] = Console(gw)
    r = app.router
    r.add_get("/console", home)
    r.add_get("/console/", home)
    r.add_get("/console/login", login)
    r.add_get("/console/callback", callback)
    r.add_post("/console/logout", logout)
    r.add_get("/console/signed-out", signed_out)
    r.add_get("/console/events", events)
    r.add_get("/console/approvals", approvals)
    r.add_get("/console/approvals/{id}", approval)
    r.add_post("/console/approvals/{id}/decide", decide)
    r.add_get("/console/sessions", sessions)
    r.add_post("/console/sessions/{id}/kill", kill)
    r.add_post("/console/sessions/{id}/lock", lock_subject)
    r.add_get("/console/sessions/{id}/watch", watch)
    r.add_get("/console/sessions/{id}/stream", stream)
    recordings_page.add_routes(r)
    r.add_static("/console/static", STATIC, append_version=False)

    async def close(_: web.Application) -> None:
        await app[CONSOLE_KEY].feed.close()  # type: ignore[attr-defined]

    app.on_cleanup.append(close)


