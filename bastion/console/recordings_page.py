"""Recordings (filter, search, verify, play, download) and evidence packages."""

from __future__ import annotations

import asyncio
import json
import shutil
from typing import Any

from aiohttp import web

from bastion.console.auth import Viewer
from bastion.console.guard import PLAYER_HEAD, PLAYER_SCRIPTS, console_of, guarded, gw_of, json_html
from bastion.console.recordings import Verdict, filters_from
from bastion.console.render import csrf_field, e, page, problem, table
from replay.reader import ReplayError, SessionSummary

VERIFY_ROWS = 100  # recordings listed with their verification (each is read in full once)


def _where(s: SessionSummary) -> str:
    meta = s.meta
    if meta.get("cluster"):
        return f"{meta['cluster']}/{meta.get('namespace') or ''}/{meta.get('pod') or ''}"
    return f"{meta.get('login')}@{meta.get('target')}" if meta.get("login") else str(meta.get("target") or "?")


def _verdict_html(v: Verdict) -> str:
    title = e("; ".join(v.problems))
    return f'<span class="verify {v.state}" title="{title}">{v.state}</span>'


def filter_form(values: dict[str, str], action: str = "/console/recordings", extra: str = "") -> str:
    def field(name: str, label: str, hint: str = "") -> str:
        return (f'<label>{label}<input name="{name}" value="{e(values.get(name, ""))}" placeholder="{e(hint)}">'
                f'</label>')

    def flag(name: str, label: str) -> str:
        checked = " checked" if values.get(name) else ""
        return f'<label class="flag"><input type="checkbox" name="{name}" value="1"{checked}>{label}</label>'

    return (f'<form method="get" action="{action}" class="filters">'
            + field("subject", "subject", "alice or e-mail") + field("target", "target or cluster")
            + field("since", "since", "2h, 3d or a date") + field("until", "until", "a date")
            + field("command", "exec command contains") + flag("approved", "had an approval")
            + flag("masked", "had masking") + extra + '<button type="submit">Filter</button></form>')


@guarded("operator", "auditor")
async def recordings(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    console = console_of(request)
    try:
        filters, values = filters_from(request.query)
    except ValueError as exc:
        return problem(400, "Bad filter", str(exc), viewer, back="/console/recordings")
    q = request.query.get("q", "").strip()
    search_values = {**values, "q": q}
    search = ('<form method="get" action="/console/recordings" class="search">'
              + "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in values.items())
              + f'<input name="q" value="{e(q)}" placeholder="search commands and output (a regex, as replay search)" '
              f'aria-label="search"><label class="flag"><input type="checkbox" name="commands" value="1"'
              f'{" checked" if request.query.get("commands") else ""}>commands only</label>'
              f'<label class="flag"><input type="checkbox" name="icase" value="1"'
              f'{" checked" if request.query.get("icase") else ""}>ignore case</label>'
              '<button type="submit">Search</button></form>')
    store = console.recordings
    if q:
        try:
            hits = await store.run(store.search, q, filters, bool(request.query.get("commands")),
                                   bool(request.query.get("icase")))
        except ValueError as exc:
            return problem(400, "Bad search", str(exc), viewer, back="/console/recordings")
        rows = [[f'<a href="/console/recordings/{e(h.session)}?t={h.t:.3f}" class="hit {e(h.kind)}" data-t="{h.t:.3f}">'
                 f'{e(h.session)}</a>', f"{h.t:.1f}s", e(h.kind), f"<code>{e(h.text[:200])}</code>"] for h in hits]
        results = table(["recording", "at", "kind", "line"], rows, "No matches.", "hits")
        body = filter_form(search_values) + search + f'<h2>Matches for <code>{e(q)}</code></h2>' + results
        return page("Recordings", body, viewer, current="recordings")
    sessions = await store.run(store.select, filters)
    verdicts = await store.run(lambda: [store.verdict(s) for s in sessions[:VERIFY_ROWS]])
    rows = []
    for i, s in enumerate(sessions):
        verdict = _verdict_html(verdicts[i]) if i < len(verdicts) else '<span class="verify">not checked</span>'
        masked = " ".join(f"{k}:{v}" for k, v in sorted((s.end.get("masking") or {}).items()) if v) or "-"
        rows.append([f'<input type="checkbox" name="id" value="{e(s.id)}" aria-label="select {e(s.id)}">',
                     f'<a href="/console/recordings/{e(s.id)}">{e(s.id)}</a>',
                     e(s.started_at.strftime("%Y-%m-%d %H:%M:%S")), e(s.identity.get("subject", "?")), e(_where(s)),
                     e(str(s.meta.get("kind", "?")) + ("/tty" if s.meta.get("tty") else "")),
                     e("-" if s.exit_status is None else s.exit_status), e(masked),
                     f'<code>{e((s.meta.get("command") or "")[:60])}</code>', verdict])
    listing = table(["", "recording", "started (UTC)", "subject", "where", "kind", "exit", "masked", "command",
                     "verification"], rows, "No recordings match.", "recordings")
    evidence = (f'<form method="post" action="/console/evidence" class="evidence">{csrf_field(viewer)}'
                + "".join(f'<input type="hidden" name="{e(k)}" value="{e(v)}">' for k, v in values.items())
                + listing + (f'<button type="submit">Evidence package of the checked recordings (none checked: '
                             f'all {len(sessions)} listed)</button>' if rows else "") + "</form>")
    return page("Recordings", filter_form(values) + search + evidence, viewer, current="recordings")


async def _open(request: web.Request, viewer: Viewer) -> SessionSummary | web.Response:
    store = console_of(request).recordings
    try:
        return await store.run(store.open, request.match_info["id"])
    except ReplayError as exc:
        return problem(404, "Not found", str(exc), viewer, back="/console/recordings")


@guarded("operator", "auditor")
async def recording(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    found = await _open(request, viewer)
    if isinstance(found, web.Response):
        return found
    s = found
    gw, store = gw_of(request), console_of(request).recordings
    gw.audit.emit("console.recording_viewed", subject=viewer.identity.subject, issuer=viewer.identity.issuer,
                  session=s.id)
    verdict = await store.run(store.verdict, s)
    try:
        markers = await store.run(store.markers, s)
    except ReplayError as exc:
        verdict, markers = Verdict("failed", (*verdict.problems, f"cannot be read: {exc}")), []
    try:
        start = max(0.0, float(request.query.get("t", "0")))
    except ValueError:
        start = 0.0
    cast = f"/console/recordings/{s.id}/cast"
    config = json.dumps({"cast": cast, "start": start, "verified": verdict.playable_as_fine,
                         "cols": int((s.meta.get("term") or {}).get("cols") or 80),
                         "rows": int((s.meta.get("term") or {}).get("rows") or 24)})
    if verdict.state == "verified":
        banner = '<p class="verify verified" role="status">Verified: signature, hash chain and segments are intact.</p>'
    elif verdict.state == "live":
        banner = ('<p class="verify live" role="status">Not sealed yet: the session is still running. '
                  f'<a href="/console/sessions/{e(s.id)}/watch">Watch it live</a>.</p>')
    else:
        banner = ('<div class="verify failed" role="alert"><b>FAILED verification.</b> This recording may have been '
                  'altered or is incomplete; what it shows cannot be trusted.<ul>'
                  + "".join(f"<li>{e(p)}</li>" for p in verdict.problems) + '</ul>'
                  '<button type="button" id="play-unverified">Play the unverified recording anyway</button></div>')
    facts = [("subject", s.identity.get("email") or s.identity.get("subject")), ("where", _where(s)),
             ("kind", s.meta.get("kind")), ("command", s.meta.get("command") or "-"),
             ("started", s.started_at.strftime("%Y-%m-%d %H:%M:%S UTC")), ("state", s.state),
             ("exit", "-" if s.exit_status is None else s.exit_status)]
    dl = "".join(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in facts)
    marks = "".join(f'<li class="marker {e(m.kind)}"><button type="button" class="seek" data-t="{m.t:.3f}">'
                    f'{m.t:.1f}s</button> {e(m.label[:160])}</li>' for m in markers)
    controls = ('<div class="controls"><label>speed <select id="speed">'
                + "".join(f'<option value="{v}"{" selected" if v == "1" else ""}>{v}×</option>'
                          for v in ("0.5", "1", "2", "4", "8")) + '</select></label> '
                f'<a href="{e(cast)}?download=1" class="button" download>download asciicast</a></div>')
    body = (f'{banner}<dl class="facts">{dl}</dl>{controls}'
            f'<div id="player" class="player{"" if verdict.playable_as_fine else " unverified"}"></div>'
            f'<h2>Markers</h2><ol class="markers">{marks or "<li>none</li>"}</ol>'
            f'<script type="application/json" id="player-config">{json_html(config)}</script>')
    return page(f"Recording {s.id}", body, viewer, current="recordings", head=PLAYER_HEAD, scripts=PLAYER_SCRIPTS)


@guarded("operator", "auditor")
async def cast(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    found = await _open(request, viewer)
    if isinstance(found, web.Response):
        return found
    store = console_of(request).recordings
    verdict = await store.run(store.verdict, found)
    try:
        text = await store.run(store.cast, found)
    except ReplayError as exc:
        refused = problem(422, "Cannot be read", str(exc), viewer)
        refused.headers["Guarita-Verification"] = verdict.state
        return refused
    headers = {"Cache-Control": "no-store", "Guarita-Verification": verdict.state}
    if request.query.get("download"):
        prefix = "" if verdict.playable_as_fine else f"{verdict.state.upper()}-"
        headers["Content-Disposition"] = f'attachment; filename="{prefix}{found.id}.cast"'
    return web.Response(text=text, content_type="application/x-asciicast", headers=headers)


@guarded("operator", "auditor")
async def evidence_form(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    body = ('<p>One package for an auditor or a regulator, the same as <code>replay evidence</code>: the stored '
            'objects as they are, transcripts, asciicast files, commands and approvals, an index, and the '
            'verification result of each session. Choose at least one filter.</p>'
            f'<form method="post" action="/console/evidence" class="filters">{csrf_field(viewer)}'
            + filter_form({}).split(">", 1)[1].rsplit("<button", 1)[0]
            + '<button type="submit">Build and download</button></form>')
    return page("Evidence", body, viewer, current="evidence")


@guarded("operator", "auditor")
async def evidence(request: web.Request, viewer: Viewer) -> web.StreamResponse:
    gw, store = gw_of(request), console_of(request).recordings
    form = request["form"]
    ids = [str(v) for v in form.getall("id", [])]
    try:
        filters, values = filters_from(form)
    except ValueError as exc:
        return problem(400, "Bad filter", str(exc), viewer, back="/console/evidence")
    if not ids and not values:
        return problem(400, "No selection", "give at least one filter (subject, target, since ...) or check "
                       "recordings: an evidence package is about someone, something or some time", viewer,
                       back="/console/evidence")
    sessions = await store.run(store.select, filters, 100000)
    if ids:
        wanted = set(ids)
        sessions = [s for s in sessions if s.id in wanted]
    if not sessions:
        return problem(404, "Nothing to package", "no recordings match this selection", viewer,
                       back="/console/evidence")
    sessions.sort(key=lambda s: s.id)
    selection = " ".join(f"--{k}" + ("" if v == "1" else f" {v}") for k, v in values.items())
    selection += (" " if selection else "") + " ".join(f"--id {i}" for i in ids)
    selection += f" (from the console, by {viewer.identity.display})"
    path = await store.run(store.evidence, sessions, selection)
    gw.audit.emit("console.evidence", subject=viewer.identity.subject, issuer=viewer.identity.issuer,
                  selection=selection, sessions=len(sessions))
    response = web.StreamResponse(headers={"Content-Disposition": f'attachment; filename="{path.name}"',
                                           "Content-Type": "application/gzip", "Cache-Control": "no-store"})
    response.content_length = path.stat().st_size
    try:
        await response.prepare(request)
        with path.open("rb") as package:
            while chunk := await asyncio.to_thread(package.read, 256 * 1024):
                await response.write(chunk)
        await response.write_eof()
    except ConnectionResetError:
        pass  # the browser went away; the package is gone with the folder below
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)
    return response


def add_routes(router: Any) -> None:
    router.add_get("/console/recordings", recordings)
    router.add_get("/console/recordings/{id}", recording)
    router.add_get("/console/recordings/{id}/cast", cast)
    router.add_get("/console/evidence", evidence_form)
    router.add_post("/console/evidence", evidence)
