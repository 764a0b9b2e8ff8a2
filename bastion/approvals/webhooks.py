"""Webhooks that announce approval requests and decisions: generic JSON or Slack-compatible.

Delivery is fire-and-forget: each POST runs in its own task with a timeout, a failure is
logged (and counted) and never delays or changes a decision.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from bastion.approvals.rules import WebhookConfig

log = logging.getLogger("guarita.approvals.webhooks")


class Webhooks:
    def __init__(self, hooks: tuple[WebhookConfig, ...], link: Callable[[str], str | None] | None = None) -> None:
        self.hooks = hooks
        # The console page of a request (bastion/console/settings.py request_link), if any.
        self.link = link
        self.failures = 0
        self.sent = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._session: aiohttp.ClientSession | None = None

    def announce(self, event: str, request: dict[str, Any], **extra: Any) -> None:
        url = self.link(request["id"]) if self.link else None
        if url:
            extra = {**extra, "url": url}
        for hook in self.hooks:
            body = slack_payload(event, request, extra) if hook.format == "slack" else json_payload(event, request, extra)
            task = asyncio.create_task(self._post(hook, body))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _post(self, hook: WebhookConfig, body: dict[str, Any]) -> None:
        try:
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            async with self._session.post(hook.url, json=body,
                                          timeout=aiohttp.ClientTimeout(total=hook.timeout)) as response:
                if response.status >= 300:
                    raise RuntimeError(f"HTTP {response.status}")
            self.sent += 1
        except (aiohttp.ClientError, OSError, RuntimeError, TimeoutError) as exc:
            self.failures += 1
            log.warning("webhook %s failed: %s (the approval goes on without it)", hook.url, exc or type(exc).__name__)

    async def close(self) -> None:
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)
        if self._session is not None:
            await self._session.close()


def public_request(request: dict[str, Any]) -> dict[str, Any]:
    """A request as the API and webhooks show it."""
    requester = request.get("requester") or {}
    return {
        "id": request["id"],
        "status": request["status"],
        "status_reason": request.get("status_reason"),
        "session": request["session_id"],
        "requester": {k: requester.get(k) for k in ("issuer", "subject", "email", "groups", "claims")},
        "front_door": request["front_door"],
        "kind": request["kind"],
        "target": request.get("target"),
        "login": request.get("login"),
        "namespace": request.get("namespace"),
        "pod": request.get("pod"),
        "command": request["command"],
        "rule": request["rule"],
        "message": request.get("message"),
        "approvers": list(request.get("approver_groups") or []),
        "min_approvals": request["min_approvals"],
        "created": request["created"],
        "expires": request["expires"],
        "decided": request.get("decided"),
        "decisions": [
            {"approver": {k: d["approver"].get(k) for k in ("issuer", "subject", "email")},
             "decision": d["decision"], "reason": d["reason"], "created": d["created"]}
            for d in request.get("decisions") or []
        ],
    }


def json_payload(event: str, request: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    return {"event": event, "request": public_request(request), **extra}


def slack_payload(event: str, request: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    r = public_request(request)
    who = r["requester"].get("email") or r["requester"].get("subject")
    where = f"{r['login']}@{r['target']}" if r.get("login") else (r.get("target") or "?")
    if event == "approval.requested":
        title = f":lock: Approval needed: `{r['id']}`"
        action = (f"`bastion approvals approve {r['id']} --reason '...'`  or  "
                  f"`bastion approvals deny {r['id']} --reason '...'`")
    else:
        title = f":white_check_mark: Request `{r['id']}` {r['status']}" if r["status"] == "approved" else \
            f":no_entry: Request `{r['id']}` {r['status']}"
        last = r["decisions"][-1] if r["decisions"] else None
        action = (f"by {last['approver'].get('email') or last['approver'].get('subject')}: {last['reason']}"
                  if last else (r.get("status_reason") or ""))
    command = r["command"].replace("```", "'''")
    text = f"{title}\n*{who}* on *{where}* ({r['kind']}), rule *{r['rule']}*\n```{command}```\n{action}"
    if extra.get("url"):
        text += f"\n<{extra['url']}|Open in the console>"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": text}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text":
                f"approvers: {', '.join(r['approvers'])} · {r['min_approvals']} needed · session {r['session']}"}]},
        ],
    }
