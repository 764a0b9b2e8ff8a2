"""The MCP server of the gateway (official SDK, ``MCPServer``): the tools an agent sees.

Every tool finds the caller's Identity on the HTTP request (verified by bastion/doors/mcp/http.py
before the SDK sees the request); the tools that run something do it through
bastion/doors/mcp/calls.py, one session of the shared pipeline per call. Errors the agent can act
on (refused, denied, unknown target) are tool results with ``isError`` and one clear line;
every call, refused or not, is in the audit log with ``front_door = mcp``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import fnmatch
import shlex
import time
from typing import TYPE_CHECKING, Annotated, Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import CallToolResult, TextContent, ToolAnnotations
from pydantic import Field

from bastion.doors.mcp.calls import Call, Calls, same_caller, wait_done
from bastion.identity import Identity
from bastion.identity.delegation import chain_fields
from bastion.policy import authorize

if TYPE_CHECKING:
    from bastion.services import Services

INSTRUCTIONS = """guarita is an access gateway: every tool call here is a recorded, audited session on real \
infrastructure, under the operator's rules. Personal data in output may be masked (e.g. [CPF]). Start \
with list_targets to see what you may reach. Some commands need a human's approval: the call then waits \
(progress notifications) and, if nobody decided in time, returns the pending request id; call \
approval_status to wait more, or stop. A denial carries the approver's reason: do not retry around it."""

# How long session_output waits for a recent call's recording to reach the store.
STORE_WAIT = 15.0
WAIT_HELP = ("If the command needs approval, wait at most this long for it before returning the pending "
             "request (the gateway's mcp.approval_wait caps it)")

# A holder per tools/call request: the tool marks it when its body runs, so the middleware can
# tell arguments the SDK refused (the tool never ran) from the tool's own results.
_entered: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar("guarita_mcp_entered",
                                                                                  default=None)


def identity_of(ctx: Context) -> tuple[Identity, str]:
    """The verified caller and its address, from the HTTP request the bridge authenticated."""
    holder = _entered.get()
    if holder is not None:
        holder["entered"] = True
    request = ctx.request_context.request
    scope = getattr(request, "scope", None) or {}
    identity = scope.get("guarita.identity")
    if not isinstance(identity, Identity):
        raise ToolError("no verified identity on this request (guarita's MCP door needs a bearer token)")
    return identity, str(scope.get("guarita.source") or "?")


def _page(data: bytes | bytearray, offset: int, limit: int) -> tuple[str, int]:
    """Text of data[offset:offset+limit], cut at a UTF-8 boundary; and the next offset."""
    chunk = bytes(data[offset:offset + limit])
    text = chunk.decode("utf-8", "ignore") if len(chunk) < limit else _cut(chunk)
    return text, offset + len(text.encode("utf-8"))


def _cut(chunk: bytes) -> str:
    for back in range(4):  # never split a multi-byte character
        try:
            return chunk[:len(chunk) - back].decode("utf-8")
        except UnicodeDecodeError:
            continue
    return chunk.decode("utf-8", "replace")


def _result(text: str, data: dict[str, Any], error: bool = False) -> CallToolResult:
    return CallToolResult(content=[TextContent(type="text", text=text)], structured_content=data, is_error=error)


class Tools:
    """The gateway's tools, bound to its services (gateway, recent calls, settings)."""

    def __init__(self, gw: Services) -> None:
        self.gw = gw
        self.settings = gw.config.mcp
        self.calls = Calls()
        gw.audit.listeners.append(self._on_audit)

    def _on_audit(self, event: str, fields: dict[str, Any]) -> None:
        """The request id and approvers of a call's approval, as soon as the request exists."""
        if event == "approval.requested":
            call = self.calls.get(str(fields.get("session")))
            if call is not None:
                call.request_id = fields.get("request")
                call.approvers = list(fields.get("approvers") or [])

    def audit(self, tool: str, identity: Identity, outcome: str, **fields: Any) -> None:
        self.gw.audit.emit("mcp.call", tool=tool, outcome=outcome, subject=identity.subject,
                           issuer=identity.issuer, front_door="mcp", **chain_fields(identity), **fields)

    # -- list_targets ------------------------------------------------------------------------------

    async def list_targets(self, ctx: Context) -> CallToolResult:
        identity, _ = identity_of(ctx)
        config = self.gw.config
        targets: list[dict[str, Any]] = []
        for t in config.targets:
            logins = [login for login in t.logins if authorize(config, identity, t, login).allowed]
            if logins:
                targets.append({"name": t.name, "logins": logins, "default_login": t.default_login
                                if t.default_login in logins else None})
        clusters = []
        for c in config.clusters:
            namespaces = sorted({ns for rule in config.access if rule.clusters
                                 and any(fnmatch.fnmatchcase(c.name, p) for p in rule.clusters)
                                 and _names(rule, identity) for ns in rule.namespaces})
            if namespaces:
                clusters.append({"name": c.name, "namespaces": namespaces})
        self.audit("list_targets", identity, "ok")
        lines = [f"You are {identity.chain}."]
        lines += [f"SSH target {t['name']}: logins {', '.join(t['logins'] or [])}" for t in targets] or ["No SSH target."]
        lines += [f"Kubernetes cluster {c['name']}: namespaces {', '.join(c['namespaces'])}" for c in clusters]
        return _result("\n".join(lines), {"identity": identity.chain, "targets": targets, "clusters": clusters})

    # -- run_command ----------------------------------------------------------------------------------

    async def run_command(self, ctx: Context, target: str, command: str | None, argv: list[str] | None,
                          login: str | None, wait: float | None = None) -> CallToolResult:
        identity, source = identity_of(ctx)
        if (command is None) == (argv is None) or (argv is not None and not argv) or command == "":
            self.audit("run_command", identity, "bad_arguments", target=target)
            raise ToolError("give exactly one of `command` (a shell line) or `argv` (a non-empty list of words)")
        line = command if command is not None else shlex.join(argv or [])
        call = Call(self.gw, identity, source, target, login, line, "run_command")
        if argv is not None:
            call.argv = list(argv)
        return await self._start(ctx, call, wait)

    async def _start(self, ctx: Context, call: Call, wait: float | None, **fields: Any) -> CallToolResult:
        self.calls.add(call)
        task = asyncio.get_running_loop().create_task(call.run())
        limit = self.settings.approval_wait if wait is None else min(wait, self.settings.approval_wait)
        result = await self._await(ctx, call, task, limit)
        self.audit(call.tool, call.identity, call.outcome if call.done.is_set() else "pending", session=call.id,
                   target=call.target_name, command=call.kept_command(), request=call.request_id, reason=call.reason,
                   **fields)
        return result

    async def _await(self, ctx: Context, call: Call, task: asyncio.Task[None], limit: float) -> CallToolResult:
        settings = self.settings
        approval_since: float | None = None
        try:
            while not await wait_done(call, min(settings.progress_interval, max(limit, 0.05))):
                if call.phase != "approval":
                    continue
                now = time.monotonic()
                approval_since = approval_since or now
                waited = now - approval_since
                if waited >= limit:
                    return self._pending(call)
                await ctx.report_progress(round(waited, 1), limit, self._waiting_line(call))
        except asyncio.CancelledError:
            call.cancel("the MCP client went away while the call waited")
            raise
        return self._outcome(call)

    @staticmethod
    def _waiting_line(call: Call) -> str:
        who = ", ".join(call.approvers) or "an approver"
        return f"waiting for approval: request {call.request_id or '(being created)'} needs {who}"

    def _pending(self, call: Call) -> CallToolResult:
        text = (f"Approval pending: request {call.request_id} needs approval from {', '.join(call.approvers) or '?'}; "
                f"the command has not run (session {call.id}). Call approval_status with request_id="
                f"{call.request_id} and wait_seconds to wait for the decision (the command runs once approved, "
                "and its output is then in the result), or stop here.")
        return _result(text, {"status": "pending", "session_id": call.id, "request_id": call.request_id,
                              "approvers": call.approvers})

    def _outcome(self, call: Call, offset: int = 0) -> CallToolResult:
        limit = self.settings.page_bytes
        out, next_out = _page(call.stdout.data, offset, limit)
        err, next_err = _page(call.stderr.data, 0, limit)
        data: dict[str, Any] = {
            "status": call.outcome, "session_id": call.id, "exit_status": call.exit_status,
            "signal": call.exit_signal, "stdout": out, "stderr": err,
            "stdout_bytes": call.stdout.total, "stderr_bytes": call.stderr.total,
            "reason": call.reason, "request_id": call.request_id, "approvers": call.approvers or None,
            "notes": call.notes or None,
        }
        more = []
        if next_out < call.stdout.total:
            more.append(f"stdout continues: call session_output with session_id={call.id} offset={next_out}")
        if next_err < call.stderr.total:
            more.append(f"stderr continues: session_output with stream=stderr offset={next_err}")
        data["truncated"] = bool(more)
        if call.outcome == "completed":
            head = f"exit status {call.exit_status}" if call.exit_signal is None else f"killed by {call.exit_signal}"
            parts = [f"{head} (session {call.id})", f"stdout:\n{out}" if out else "stdout: (empty)"]
            if err:
                parts.append(f"stderr:\n{err}")
            return _result("\n".join(parts + more), data)
        where = f" (request {call.request_id})" if call.request_id else ""
        return _result(f"{call.outcome}{where}: {call.reason} (session {call.id})", data, error=True)

    # -- Kubernetes ---------------------------------------------------------------------------------

    async def list_pods(self, ctx: Context, cluster: str, namespace: str) -> CallToolResult:
        from bastion.doors.mcp.calls import CallRefused
        from bastion.doors.mcp.podcalls import list_pods

        identity, _ = identity_of(ctx)
        try:
            pods = await list_pods(self.gw, identity, cluster, namespace)
        except CallRefused as exc:
            self.audit("list_pods", identity, "refused", cluster=cluster, namespace=namespace, reason=str(exc))
            return _result(str(exc), {"status": "refused", "reason": str(exc)}, error=True)
        self.audit("list_pods", identity, "ok", cluster=cluster, namespace=namespace)
        lines = [f"{p['name']}  {p['phase']}  containers: {', '.join(p['containers'])}" for p in pods]
        return _result("\n".join(lines) or f"no pods in {namespace}", {"cluster": cluster, "namespace": namespace,
                                                                        "pods": pods})

    async def exec_in_pod(self, ctx: Context, cluster: str, namespace: str, pod: str, argv: list[str],
                          container: str | None, wait: float | None = None) -> CallToolResult:
        from bastion.doors.mcp.podcalls import PodCall

        identity, source = identity_of(ctx)
        call = PodCall(self.gw, identity, source, cluster, namespace, pod, container, argv)
        return await self._start(ctx, call, wait, pod=pod, namespace=namespace)

    # -- session_output ------------------------------------------------------------------------------

    async def session_output(self, ctx: Context, session_id: str, stream: str, offset: int,
                             limit: int | None) -> CallToolResult:
        identity, _ = identity_of(ctx)
        limit = min(limit or self.settings.page_bytes, self.settings.page_bytes)
        call = self.calls.get(session_id)
        if call is not None:
            if not same_caller(call.identity, identity):
                self._not_yours("session_output", identity, session_id)
            if not call.done.is_set():
                return _result(f"session {session_id} is still {call.phase}; try again when it has ended",
                               {"status": call.phase, "session_id": session_id})
            kept = call.stderr if stream == "stderr" else call.stdout
            data, total = bytes(kept.data), kept.total
            if offset + limit > len(data) and total > len(data):  # beyond what the call kept in memory
                data = await self._recorded_when_stored(call, identity, stream)
                total = len(data)
        else:
            data = await asyncio.to_thread(self._recorded, identity, session_id, "e" if stream == "stderr" else "o")
            total = len(data)
        text, nxt = _page(data, offset, limit)
        self.audit("session_output", identity, "ok", session=session_id, offset=offset)
        tail = (f"\n[{total - nxt} more bytes: call session_output with offset={nxt}]" if nxt < len(data)
                else "")
        return _result(text + tail, {"session_id": session_id, "stream": stream, "offset": offset,
                                     "next_offset": nxt if nxt < len(data) else None, "total_bytes": total,
                                     "text": text})

    async def _recorded_when_stored(self, call: Call, identity: Identity, stream: str) -> bytes:
        """A recent call's output from its recording, once sealed and uploaded (moments after
        the call answered)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(call.sealed.wait(), STORE_WAIT)
        deadline = time.monotonic() + STORE_WAIT
        while True:
            try:
                data = await asyncio.to_thread(self._recorded, identity, call.id, "e" if stream == "stderr" else "o")
            except ToolError:
                data = b""
            kept = call.stderr if stream == "stderr" else call.stdout
            if len(data) >= kept.total or time.monotonic() > deadline:
                if not data:
                    raise ToolError(f"the recording of {call.id} is not in the store yet; try again shortly")
                return data
            await asyncio.sleep(0.2)

    def _recorded(self, identity: Identity, session_id: str, code: str) -> bytes:
        """The output of an ended session of this caller, from the recordings store (any door)."""
        from recorder.store import is_session_id
        from replay.reader import ReplayError, iter_events, open_session

        if not is_session_id(session_id):
            raise ToolError(f"{session_id!r} is not a session id (like 20261207-210102-1a2b3c4d)")
        try:
            summary = open_session(self.gw.store, session_id)
        except (ReplayError, Exception):
            raise ToolError(f"no recorded session {session_id!r} (it may still be live, or not be yours)") from None
        if not same_caller(Identity.from_dict(summary.identity), identity):
            self._not_yours("session_output", identity, session_id)
        out = bytearray()
        for event in iter_events(self.gw.store, summary):
            if event.code == code or event.code.startswith(code) and len(event.code) == 2:
                out += event.stream_bytes() or b""
        return bytes(out)

    def _not_yours(self, tool: str, identity: Identity, ref: str) -> None:
        self.audit(tool, identity, "refused", reason="not the caller's", ref=ref)
        raise ToolError(f"{ref!r} is not yours: only the identity (and delegation chain) that ran it may read it")

    # -- approval_status -------------------------------------------------------------------------------

    async def approval_status(self, ctx: Context, request_id: str, wait_seconds: float) -> CallToolResult:
        identity, _ = identity_of(ctx)
        row = await self.gw.state.get_request(request_id)
        if row is None:
            self.audit("approval_status", identity, "not_found", request=request_id)
            raise ToolError(f"no approval request {request_id!r}")
        if not same_caller(Identity.from_dict(row.get("requester") or {"issuer": "", "subject": ""}), identity):
            self._not_yours("approval_status", identity, request_id)
        call = self.calls.by_request(request_id)
        wait = min(max(wait_seconds, 0.0), self.settings.approval_wait)
        deadline = time.monotonic() + wait
        try:
            while row is not None and row["status"] == "pending" and time.monotonic() < deadline:
                left = deadline - time.monotonic()
                if call is not None:
                    await wait_done(call, min(self.settings.progress_interval, left))
                else:
                    await asyncio.sleep(min(self.settings.progress_interval, left))
                row = await self.gw.state.get_request(request_id) or row
                if row["status"] == "pending":
                    await ctx.report_progress(round(wait - (deadline - time.monotonic()), 1), wait,
                                              f"request {request_id} still pending")
        except asyncio.CancelledError:
            raise  # the caller stopped waiting; the request stays (it belongs to its session)
        self.audit("approval_status", identity, row["status"], request=request_id)
        if call is not None and row["status"] == "approved" and wait > 0:
            await wait_done(call, max(0.0, deadline - time.monotonic()))
            if call.done.is_set():
                return self._outcome(call)
        decisions = [{"approver": d["approver"].get("email") or d["approver"].get("subject"),
                      "decision": d.get("decision"), "reason": d.get("reason")} for d in row.get("decisions") or []]
        text = f"request {request_id}: {row['status']}"
        if row.get("status_reason"):
            text += f" ({row['status_reason']})"
        text += "".join(f"\n{d['decision']} by {d['approver']}: {d['reason']}" for d in decisions)
        if row["status"] == "pending":
            text += f"\nstill waiting for {', '.join(row.get('approver_groups') or [])}"
        return _result(text, {"request_id": request_id, "status": row["status"], "command": row.get("command"),
                              "session_id": row.get("session_id"), "approvers": row.get("approver_groups"),
                              "decisions": decisions})


def _names(rule: Any, identity: Identity) -> bool:
    from bastion.policy import matches_identity

    return matches_identity(rule, identity)


def build_server(gw: Services) -> tuple[MCPServer, Tools]:
    tools = Tools(gw)
    server: MCPServer = MCPServer("guarita", instructions=INSTRUCTIONS, version="1")
    read_only = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    @server.tool(description="List what you may reach through guarita: SSH targets with the logins you may use, "
                 "and Kubernetes clusters with their namespaces. Also says who you are (and for whom you act).",
                 annotations=read_only)
    async def list_targets(ctx: Context) -> CallToolResult:
        return await tools.list_targets(ctx)

    @server.tool(description="Run a command on an SSH target through guarita and return its stdout, stderr, "
                 "exit status and session id. Give `command` (one shell line) or `argv` (words, quoted for you). "
                 "No stdin, no terminal. Output beyond the page size is paged with session_output. Commands "
                 "may need a human's approval: the call then waits and may return a pending request id.",
                 annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def run_command(
        ctx: Context,
        target: Annotated[str, Field(description="SSH target name, from list_targets", min_length=1,
                                     max_length=200)],
        command: Annotated[str | None, Field(description="A shell command line", max_length=65536)] = None,
        argv: Annotated[list[str] | None, Field(description="The command as words (instead of `command`)",
                                                max_length=4096)] = None,
        login: Annotated[str | None, Field(description="Login on the target (default: the target's)",
                                           max_length=200)] = None,
        approval_wait_seconds: Annotated[float | None, Field(ge=0, le=3600, description=WAIT_HELP)] = None,
    ) -> CallToolResult:
        return await tools.run_command(ctx, target, command, argv, login, approval_wait_seconds)

    @server.tool(description="Read the output of one of your own sessions (any earlier run_command, or an "
                 "ssh/kubectl session of yours that has ended), a page at a time from `offset` (bytes).",
                 annotations=read_only)
    async def session_output(
        ctx: Context,
        session_id: Annotated[str, Field(description="The session id a call returned", min_length=1,
                                         max_length=100)],
        stream: Annotated[str, Field(pattern="^(stdout|stderr)$", description="stdout or stderr")] = "stdout",
        offset: Annotated[int, Field(ge=0, description="Byte offset to read from")] = 0,
        limit: Annotated[int | None, Field(ge=1, description="Most bytes to return")] = None,
    ) -> CallToolResult:
        return await tools.session_output(ctx, session_id, stream, offset, limit)

    @server.tool(description="See the state of one of your approval requests (pending, approved, denied with the "
                 "approver's reason, expired, cancelled), waiting up to `wait_seconds` for a decision. When the "
                 "request was for a run_command call and it is approved, the command's result is returned.",
                 annotations=read_only)
    async def approval_status(
        ctx: Context,
        request_id: Annotated[str, Field(min_length=1, max_length=100, description="The request id")],
        wait_seconds: Annotated[float, Field(ge=0, le=3600, description="How long to wait for a decision")] = 0,
    ) -> CallToolResult:
        return await tools.approval_status(ctx, request_id, wait_seconds)

    @server.tool(description="List the pods of a namespace in a Kubernetes cluster you may use (names, phase, "
                 "containers), asked of the cluster as you.", annotations=read_only)
    async def list_pods(
        ctx: Context,
        cluster: Annotated[str, Field(min_length=1, max_length=200, description="Cluster name, from list_targets")],
        namespace: Annotated[str, Field(min_length=1, max_length=253, description="Namespace")] = "default",
    ) -> CallToolResult:
        return await tools.list_pods(ctx, cluster, namespace)

    @server.tool(description="Run a command in a pod (like `kubectl exec POD -- ARGV`, no stdin, no terminal) and "
                 "return stdout, stderr, exit status and session id. Recorded, masked and approval-gated like "
                 "run_command.", annotations=ToolAnnotations(destructive_hint=True, open_world_hint=True))
    async def exec_in_pod(
        ctx: Context,
        cluster: Annotated[str, Field(min_length=1, max_length=200, description="Cluster name")],
        pod: Annotated[str, Field(min_length=1, max_length=253, description="Pod name")],
        argv: Annotated[list[str], Field(min_length=1, max_length=4096, description="The command as words")],
        namespace: Annotated[str, Field(min_length=1, max_length=253, description="Namespace")] = "default",
        container: Annotated[str | None, Field(max_length=253, description="Container (default: the pod's "
                                                                          "first)")] = None,
        approval_wait_seconds: Annotated[float | None, Field(ge=0, le=3600, description=WAIT_HELP)] = None,
    ) -> CallToolResult:
        return await tools.exec_in_pod(ctx, cluster, namespace, pod, argv, container, approval_wait_seconds)

    known = {"list_targets", "run_command", "session_output", "approval_status", "list_pods", "exec_in_pod"}

    async def audit_refusals(ctx: Any, call_next: Any) -> Any:
        """Unknown tools and arguments the SDK refused never reach a tool: audit them here."""
        if ctx.method != "tools/call":
            return await call_next(ctx)
        params = ctx.params or {}
        name = params.get("name") if isinstance(params, dict) else None
        holder: dict[str, Any] = {"entered": False}
        token = _entered.set(holder)
        try:
            result = await call_next(ctx)
        finally:
            _entered.reset(token)
        # The SDK hands middleware the result in its wire form (a dict), or as a model.
        wire = result if isinstance(result, dict) else getattr(result, "model_dump", lambda **_: {})(by_alias=True)
        if not holder["entered"] and wire.get("isError"):
            scope = getattr(ctx.request, "scope", None) or {}
            who = scope.get("guarita.identity")
            text = " ".join(str(c.get("text", "")) for c in wire.get("content") or () if isinstance(c, dict))
            gw.audit.emit("mcp.refused", tool=str(name)[:100], reason="unknown_tool" if name not in known
                          else "bad_arguments", detail=text[:300], front_door="mcp",
                          subject=getattr(who, "subject", None), source=scope.get("guarita.source"))
        return result

    server.middleware.append(audit_refusals)
    return server, tools
