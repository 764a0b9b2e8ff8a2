"""HTTP API for operators and auditors: locks, live sessions, session kills (issue 8).

    POST   /v1/locks                  {"kind", "value", "reason", "until"?}   operator
    GET    /v1/locks[?all=1]                                                   operator, auditor
    DELETE /v1/locks/ID                                                        operator
    GET    /v1/sessions                                                        operator, auditor
    POST   /v1/sessions/ID/kill       {"reason"}                               operator

Roles come from ``[roles]`` (bastion/control/roles.py); anyone else gets 403.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from aiohttp import web

from bastion.control import LockError, has_role
from bastion.http.api import GATEWAY_KEY, _authenticated, _error
from bastion.identity import Identity
from bastion.state import Conflict, NotFound, StateError

if TYPE_CHECKING:
    from bastion.services import Services


def _gw(request: web.Request) -> Services:
    return request.app[GATEWAY_KEY]  # type: ignore[return-value]


def _forbidden(gw: Services, identity: Identity, action: str, roles: tuple[str, ...]) -> web.Response | None:
    if any(has_role(gw.config.roles, identity, role) for role in roles):
        return None
    gw.audit.emit("api.forbidden", subject=identity.subject, issuer=identity.issuer, action=action,
                  needs=list(roles))
    names = " or ".join(f"{r} ([roles] {r}s)" for r in roles)
    return _error(403, "forbidden", f"{identity.display} may not {action}: it takes the {names} role")


async def _body(request: web.Request) -> dict[str, Any]:
    body = await request.json() if request.can_read_body else {}
    if not isinstance(body, dict):
        raise ValueError("not an object")
    return body


def _session_json(row: dict[str, Any]) -> dict[str, Any]:
    identity = row.get("identity") or {}
    return {"id": row["id"], "replica": row.get("replica_name") or row.get("replica_id"),
            "replica_id": row.get("replica_id"), "subject": row.get("subject"), "email": identity.get("email"),
            "issuer": identity.get("issuer"), "groups": identity.get("groups") or [],
            "front_door": row.get("front_door"), "target": row.get("target"), "login": row.get("login"),
            "kind": row.get("kind"), "command": row.get("command"), "source": row.get("source"),
            "started": row.get("started"), "bytes_in": row.get("bytes_in"), "bytes_out": row.get("bytes_out"),
            "updated": row.get("updated"), "pending_approvals": row.get("pending_approvals", 0)}


@_authenticated
async def locks_create(request: web.Request, identity: Identity) -> web.Response:
    gw = _gw(request)
    if (refused := _forbidden(gw, identity, "create locks", ("operator",))) is not None:
        return refused
    try:
        body = await _body(request)
        kind, value = str(body["kind"]), str(body["value"])
        reason = str(body.get("reason") or "")
        until = float(body["until"]) if body.get("until") is not None else None
    except (ValueError, KeyError, TypeError):
        return _error(400, "bad_request", 'send JSON {"kind": "subject|group|target|claim", "value": "...", '
                                          '"reason": "why", "until": unix_time_or_null}')
    try:
        lock, found = await gw.control.create_lock(kind, value, reason, identity, until)
    except LockError as exc:
        return _error(400, "bad_lock", str(exc))
    except StateError as exc:
        return _error(503, "state_unavailable", f"the lock was not stored: {exc}")
    return web.json_response({"lock": lock.to_json(), **found}, status=201)


@_authenticated
async def locks_list(request: web.Request, identity: Identity) -> web.Response:
    gw = _gw(request)
    if (refused := _forbidden(gw, identity, "list locks", ("operator", "auditor"))) is not None:
        return refused
    include = request.query.get("all", "") not in ("", "0", "false")
    from bastion.control import Lock

    rows = await gw.state.list_locks(include_inactive=include)
    return web.json_response({"locks": [Lock.from_row(r).to_json() for r in rows], "now": time.time()})


@_authenticated
async def locks_delete(request: web.Request, identity: Identity) -> web.Response:
    gw = _gw(request)
    if (refused := _forbidden(gw, identity, "lift locks", ("operator",))) is not None:
        return refused
    lock_id = request.match_info["id"]
    try:
        lock = await gw.control.remove_lock(lock_id, identity)
    except NotFound:
        return _error(404, "not_found", f"no lock {lock_id!r} (see `bastion lock ls`)")
    except Conflict as exc:
        return _error(409, "already_lifted", str(exc))
    return web.json_response({"lock": lock.to_json()})


@_authenticated
async def sessions_list(request: web.Request, identity: Identity) -> web.Response:
    gw = _gw(request)
    if (refused := _forbidden(gw, identity, "list live sessions", ("operator", "auditor"))) is not None:
        return refused
    rows = await gw.state.live_sessions_overview()
    return web.json_response({"sessions": [_session_json(r) for r in rows], "now": time.time()})


@_authenticated
async def sessions_kill(request: web.Request, identity: Identity) -> web.Response:
    gw = _gw(request)
    if (refused := _forbidden(gw, identity, "kill sessions", ("operator",))) is not None:
        return refused
    sid = request.match_info["id"]
    try:
        reason = str((await _body(request)).get("reason") or "")
    except ValueError:
        return _error(400, "bad_request", 'send JSON {"reason": "why"}')
    try:
        row = await gw.control.kill(sid, identity, reason)
    except LockError as exc:
        return _error(400, "reason_required", str(exc))
    except NotFound as exc:
        return _error(404, "not_found", str(exc))
    return web.json_response({"session": _session_json(row), "killed": True})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/locks", locks_create)
    app.router.add_get("/v1/locks", locks_list)
    app.router.add_delete("/v1/locks/{id}", locks_delete)
    app.router.add_get("/v1/sessions", sessions_list)
    app.router.add_post("/v1/sessions/{id}/kill", sessions_kill)
