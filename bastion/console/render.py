"""HTML for the console: one layout (string.Template) and small helpers that escape everything.

Pages are rendered on the server; console.js only refreshes the ``#live`` part of a page when
the server says something changed, counts ages down, and drives the recording player.
"""

from __future__ import annotations

import hashlib
import html
import re
import time
from datetime import UTC, datetime
from string import Template
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from bastion.console.auth import Viewer

LAYOUT = Template("""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>$title · guarita</title>
<link rel="stylesheet" href="/console/static/console.css">
$head</head>
<body data-live="$live" data-csrf="$csrf">
<header><a class="brand" href="/console/">guarita</a>
<nav>$nav</nav>
<span class="who">$who</span></header>
<main>
<h1>$title</h1>
$body
</main>
<script src="/console/static/console.js"></script>
$scripts</body></html>
""")

_RELATIVE = re.compile(r'(<span class="rel"[^>]*>)[^<]*')

NAV = (("approvals", "/console/approvals", ("approver", "operator", "auditor")),
       ("sessions", "/console/sessions", ("operator", "auditor")),
       ("recordings", "/console/recordings", ("operator", "auditor")),
       ("evidence", "/console/evidence", ("operator", "auditor")))

SECURITY_HEADERS = {
    # Everything is served by the gateway itself: no CDN, no inline script.
    "Content-Security-Policy": "default-src 'self'; script-src 'self' 'wasm-unsafe-eval'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'; form-action 'self' http: https:",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def when(ts: float | None) -> str:
    if not ts:
        return "-"
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<time data-ts="{ts:.3f}" title="{stamp}">{stamp}</time>'


def age(ts: float | None, kind: str = "age") -> str:
    """A relative time console.js keeps counting (``age``: "12s ago", ``until``: "in 4m")."""
    if not ts:
        return "-"
    stamp = datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f'<span class="rel" data-{kind}="{ts:.3f}" title="{stamp}">{e(relative(ts, kind))}</span>'


def relative(ts: float, kind: str = "age") -> str:
    delta = abs(time.time() - ts)
    text = (f"{delta:.0f}s" if delta < 60 else f"{delta / 60:.0f}m" if delta < 3600
            else f"{delta / 3600:.1f}h" if delta < 86400 else f"{delta / 86400:.1f}d")
    if kind == "until":
        return f"in {text}" if ts > time.time() else f"{text} ago"
    return f"{text} ago"


def csrf_field(viewer: Viewer) -> str:
    return f'<input type="hidden" name="csrf" value="{e(viewer.csrf)}">'


def nav(viewer: Viewer | None, current: str) -> str:
    if viewer is None:
        return ""
    links = [f'<a href="{href}"{" class=current" if name == current else ""}>{name}</a>'
             for name, href, roles in NAV if viewer.has(*roles)]  # type: ignore[arg-type]
    return " ".join(links)


def who(viewer: Viewer | None) -> str:
    if viewer is None:
        return ""
    roles = ", ".join(sorted(viewer.roles)) or "no console role"
    return (f'{e(viewer.identity.display)} <small>({e(roles)})</small> '
            f'<form method="post" action="/console/logout" class="inline">{csrf_field(viewer)}'
            f'<button type="submit" class="link">sign out</button></form>')


def page(title: str, body: str, viewer: Viewer | None = None, *, current: str = "", live: str = "",
         status: int = 200, head: str = "", scripts: str = "") -> web.Response:
    text = LAYOUT.substitute(title=e(title), body=body, nav=nav(viewer, current), who=who(viewer), live=e(live),
                             csrf=e(viewer.csrf if viewer else ""), head=head, scripts=scripts)
    return web.Response(text=text, status=status, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


def digest(body: str) -> str:
    """What a live part shows, without the relative times console.js counts itself: the page
    replaces its #live part only when this changes (no flicker, no lost clicks)."""
    return hashlib.sha256(_RELATIVE.sub(r"\1", body).encode()).hexdigest()[:16]


def live(body: str) -> str:
    return f'<div id="live" data-digest="{digest(body)}">{body}</div>'


def fragment(body: str) -> web.Response:
    return web.Response(text=body, content_type="text/html", charset="utf-8",
                        headers={**SECURITY_HEADERS, "Guarita-Digest": digest(body)})


def problem(status: int, title: str, message: str, viewer: Viewer | None = None, back: str = "") -> web.Response:
    link = f'<p><a href="{e(back)}">back</a></p>' if back else ""
    return page(title, f'<p class="error" role="alert">{e(message)}</p>{link}', viewer, status=status)


def table(headers: list[str], rows: list[list[str]], empty: str, css: str = "") -> str:
    if not rows:
        return f'<p class="empty">{e(empty)}</p>'
    head = "".join(f"<th>{e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    # Wide tables scroll inside their box on a phone; the page itself keeps the screen's width.
    return (f'<div class="scroll"><table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            '</table></div>')
