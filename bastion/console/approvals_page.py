"""The approvals page: pending requests (decide with a reason) and decided ones (who, when, why)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bastion.approvals.webhooks import public_request
from bastion.console.render import age, csrf_field, e, table, when

if TYPE_CHECKING:
    from bastion.approvals.engine import ApprovalEngine
    from bastion.console.auth import Viewer


def _who(person: dict[str, Any]) -> str:
    return str(person.get("email") or person.get("subject") or "?")


def delegation(request: dict[str, Any]) -> str:
    """The requester's delegation chain (RFC 8693 ``act``, current actor first), as Identity.display
    writes it: the subject, then via each actor from the first to the current one."""
    chain = (request.get("requester") or {}).get("act") or []
    actors = [str(a.get("sub")) for a in chain if isinstance(a, dict) and a.get("sub")]
    if not actors:
        return ""
    return f'<div class="delegation">delegated: via {e(" via ".join(reversed(actors)))}</div>'


def where(r: dict[str, Any]) -> str:
    if r.get("pod"):
        return f"{r.get('target') or ''}/{r.get('namespace') or ''}/{r['pod']}"
    return f"{r['login']}@{r.get('target')}" if r.get("login") else str(r.get("target") or "?")


def decisions(r: dict[str, Any]) -> str:
    items = [f'<li class="decision {e(d["decision"])}"><b>{e(d["decision"])}</b> by {e(_who(d["approver"]))} '
             f'{when(d["created"])}: <q>{e(d["reason"])}</q></li>' for d in r["decisions"]]
    return f'<ul class="decisions">{"".join(items)}</ul>' if items else ""


def card(raw: dict[str, Any], viewer: Viewer, engine: ApprovalEngine, back: str = "/console/approvals") -> str:
    """One request; ``back`` is the page a decision returns to."""
    r = public_request(raw)
    rid = r["id"]
    own = engine._is_requester(raw, viewer.identity)  # noqa: SLF001 - the engine's own test, not a copy
    may_decide = (r["status"] == "pending" and not own and not viewer.identity.delegated
                  and engine._is_approver(raw, viewer.identity))  # noqa: SLF001
    facts = [
        ("requester", e(_who(r["requester"])) + delegation(raw)),
        ("target", e(where(r)) + f' <small>({e(r["front_door"])}, {e(r["kind"])})</small>'),
        ("session", f'<a href="/console/sessions/{e(r["session"])}/watch">{e(r["session"])}</a>'
                    + (' <small>(watch live)</small>' if r["status"] == "pending" else "")),
        ("rule", e(r["rule"]) + (f' <small>{e(r["message"])}</small>' if r.get("message") else "")),
        ("approvers", f'{e(", ".join(r["approvers"]))} <small>({r["min_approvals"]} needed)</small>'),
        ("asked", age(r["created"])),
        ("expires" if r["status"] == "pending" else "decided",
         age(r["expires"], "until") if r["status"] == "pending" else when(r.get("decided"))),
    ]
    dl = "".join(f"<dt>{k}</dt><dd>{v}</dd>" for k, v in facts)
    status = f'<span class="status {e(r["status"])}">{e(r["status"])}</span>'
    reason = f' <small>{e(r["status_reason"])}</small>' if r.get("status_reason") else ""
    if may_decide:
        action = (f'<form method="post" action="/console/approvals/{e(rid)}/decide" class="decide">{csrf_field(viewer)}'
                  f'<input type="hidden" name="back" value="{e(back)}">'
                  f'<input name="reason" required placeholder="reason (kept for auditors)" aria-label="reason" '
                  f'id="reason-{e(rid)}">'
                  f'<button name="decision" value="approve" class="approve">Approve</button>'
                  f'<button name="decision" value="deny" class="deny">Deny</button></form>')
    elif own and r["status"] == "pending":
        action = '<p class="note">Your own request: another approver must decide.</p>'
    elif r["status"] == "pending":
        action = '<p class="note">You are not in an approver group of this request.</p>'
    else:
        action = ""
    return (f'<article class="request {e(r["status"])}" id="req-{e(rid)}" data-id="{e(rid)}">'
            f'<h2><a href="/console/approvals/{e(rid)}">{e(rid)}</a> {status}{reason}</h2>'
            f'<pre class="command" title="the command as it will run">{e(r["command"])}</pre>'
            f'<dl>{dl}</dl>{decisions(r)}{action}</article>')


def listing(rows: list[dict[str, Any]], viewer: Viewer, engine: ApprovalEngine) -> str:
    pending = [r for r in rows if r["status"] == "pending"]
    decided = [r for r in rows if r["status"] != "pending"]
    cards = "".join(card(r, viewer, engine) for r in pending) or '<p class="empty">Nothing waits for a decision.</p>'
    history = []
    for raw in decided:
        r = public_request(raw)
        last = r["decisions"][-1] if r["decisions"] else None
        history.append([
            f'<a href="/console/approvals/{e(r["id"])}">{e(r["id"])}</a>',
            f'<span class="status {e(r["status"])}">{e(r["status"])}</span>',
            f'<code>{e(r["command"][:120])}</code>',
            e(_who(r["requester"])),
            e(_who(last["approver"])) if last else e(r.get("status_reason") or "-"),
            when(r.get("decided")),
            f'<q>{e(last["reason"])}</q>' if last else "",
        ])
    return (f'<section id="pending"><h2>Pending ({len(pending)})</h2>{cards}</section>'
            f'<section id="decided"><h2>Decided</h2>'
            + table(["request", "status", "command", "requester", "by", "when", "why"], history,
                    "No decided requests yet.", "decided") + "</section>")
