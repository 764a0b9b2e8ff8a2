"""Signals: SIGTERM drains the gateway, SIGHUP reloads its rules.

SIGTERM (or SIGINT) -- :func:`drain`:

1. ``/readyz`` answers 503 at once (``gateway.draining``), so a load balancer stops
   sending new connections; every front door stops accepting (``FrontDoor.stop_accepting``:
   the SSH and Kubernetes listeners close; connections already open stay, new sessions on
   them are refused; the HTTP API, where MCP lives, stays up to answer);
2. every live session gets a notice on its terminal or stderr ("guarita: this gateway is
   shutting down; your session ends in 30s") and may go on for ``gateway.drain_grace``;
3. sessions still open then are ended by the gateway (a ``terminated`` marker in their
   recording), every recording is sealed, and the spool gets a bounded time to upload (what
   is not uploaded stays sealed in the spool and goes up at the next start). The process
   exits 0.

A second SIGTERM or SIGINT during the grace period cuts it short.

SIGHUP -- :func:`reload`: the config file is read and validated again. Invalid: the
problems are logged and the running configuration stays. Valid: targets, access rules,
approval rules and defaults, webhooks, ``ssh.env_allowlist``, ``gateway.drain_grace`` and
``gateway.metrics_public`` take effect for what happens next (new sessions, the next
command an approval rule sees); live sessions go on. Every other changed key (listen
addresses, keys, the recordings store, the state database, issuers, clusters...) is named
in the log as needing a restart, and keeps its running value.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import tomllib
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from bastion.config import CONFIG_KEYS, ConfigError

if TYPE_CHECKING:
    from bastion.services import Services

log = logging.getLogger("guarita.lifecycle")

# Config attributes a reload replaces (their keys are marked reload=True in CONFIG_KEYS).
RELOADED_FIELDS = ("targets", "access", "approvals", "env_allowlist", "ssh_banner", "drain_grace", "metrics_public")
# How long the spool may take to upload after the sessions ended (then it waits for the next start).
UPLOAD_TIMEOUT = 10.0


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60 or seconds % 60:
        return f"{seconds}s"
    return f"{seconds // 60}m"


# -- SIGTERM ---------------------------------------------------------------------------------


async def drain(gw: Services) -> None:
    """Stop taking connections, give live sessions their grace period with a notice."""
    gw.draining = True
    grace = gw.config.drain_grace
    live = list(gw.live)
    log.info("draining: no new connections; %d live session(s) get %s to finish (a second SIGTERM ends them now)",
             len(live), format_seconds(grace), extra={"sessions": len(live), "grace": grace})
    gw.audit.emit("gateway.draining", sessions=len(live), grace=grace)
    for door in gw.doors:
        await door.stop_accepting()
    if not live or grace <= 0:
        return
    message = f"this gateway is shutting down; your session ends in {format_seconds(grace)}"
    for session in live:
        notify(session, message)
    deadline = time.monotonic() + grace
    while gw.live and not gw.hurry.is_set():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(gw.hurry.wait(), min(remaining, 0.1))
    if gw.live:
        why = "a second signal" if gw.hurry.is_set() else "grace period over"
        log.info("drain: %s; ending %d session(s)", why, len(gw.live))


def end_message(gw: Services) -> str:
    """What a session ended by the shutdown tells its user (and its recording)."""
    if gw.draining and gw.config.drain_grace > 0:
        return (f"this gateway shut down; the session was ended after its {format_seconds(gw.config.drain_grace)} "
                "grace period (connect again to reach another replica)")
    return "this gateway shut down; connect again to reach another replica"


def notify(session: Any, message: str) -> None:
    """A notice to a live session's user on its terminal or stderr (never into a command's
    stdout), recorded as a ``notice`` marker."""
    try:
        session.notify(message)  # marker + the front door's notify_user
    except Exception as exc:  # noqa: BLE001 - one broken channel must not stop the drain
        log.debug("cannot notify a session: %s", exc)


# -- SIGHUP ----------------------------------------------------------------------------------


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    """``{"gateway": {"ssh_listen": ...}, "targets": [...]}`` -> ``{"gateway.ssh_listen": ..., "targets": [...]}``:
    single tables key by key (one level down), arrays of tables as a whole."""
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if isinstance(value, dict):
            for key, sub in value.items():
                out[f"{name}.{key}"] = sub
        else:
            out[name] = value
    return out


def _reloadable(key: str) -> bool:
    """Whether a changed key (``gateway.ssh_listen``, ``targets``, ``roles.operators``) takes effect
    on reload: decided by CONFIG_KEYS, whose ``reload`` flags say so per key."""
    matches = [k for k in CONFIG_KEYS if k.key == key or k.key.startswith(key + ".") or k.key.startswith(key + "[]")]
    return bool(matches) and all(k.reload for k in matches)


def changed_keys(old_raw: dict[str, Any], new_raw: dict[str, Any]) -> list[str]:
    old, new = _flatten(old_raw), _flatten(new_raw)
    return sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))


def reload(gw: Services) -> bool:
    """Re-read the config file; apply what can change live. True when a new config was applied."""
    source = gw.config_source
    metrics = gw.metrics
    if source is None:
        log.warning("SIGHUP: this gateway runs without a config file (--dev without --config): nothing to reload")
        return False
    path = source.path
    try:
        raw, new = source.load()
    except ConfigError as exc:
        log.error("SIGHUP: %s has problems; the running configuration stays: %s", path,
                  "; ".join(f"{k}: {m}" for k, m in exc.problems), extra={"problems": [f"{k}: {m}" for k, m in
                                                                                  exc.problems]})
        gw.audit.emit("config.reload_failed", file=str(path), problems=[f"{k}: {m}" for k, m in exc.problems])
        if metrics is not None:
            metrics.reloads.labels("invalid").inc()
        return False
    except (OSError, tomllib.TOMLDecodeError) as exc:
        log.error("SIGHUP: cannot read %s: %s; the running configuration stays", path, exc)
        if metrics is not None:
            metrics.reloads.labels("invalid").inc()
        return False
    changed = changed_keys(gw.config_raw or {}, raw)
    restart = [k for k in changed if not _reloadable(k)]
    applied = [k for k in changed if _reloadable(k)]
    old = gw.config
    targets = new.targets
    demo = old.target("demo") if gw.demo is not None else None
    if demo is not None and new.target(demo.name) is None:
        targets = (*targets, demo)
    values = {name: getattr(new, name) for name in RELOADED_FIELDS}
    values["targets"] = targets
    gw.config = replace(old, **values)
    approvals = gw.approvals
    if approvals is not None and new.approvals != old.approvals:
        _swap_approvals(approvals, new.approvals)
    if metrics is not None:
        metrics.reloads.labels("applied").inc()
    # The raw file is kept without the keys that were not applied: they are reported again
    # at the next reload until the gateway restarts.
    kept = dict(raw)
    old_raw = gw.config_raw or {}
    for key in restart:
        section, _, name = key.partition(".")
        if name:
            table = dict(kept.get(section) or {})
            if name in (old_raw.get(section) or {}):
                table[name] = old_raw[section][name]
            else:
                table.pop(name, None)
            kept[section] = table
        elif section in old_raw:
            kept[section] = old_raw[section]
        else:
            kept.pop(section, None)
    gw.config_raw = kept
    log.info("SIGHUP: reloaded %s: %s", path, ", ".join(applied) if applied else "no change that applies live",
             extra={"applied": applied, "restart_needed": restart})
    if restart:
        log.warning("SIGHUP: these keys changed but take effect only after a restart: %s", ", ".join(restart),
                    extra={"restart_needed": restart})
    gw.audit.emit("config.reloaded", file=str(path), applied=applied, restart_needed=restart)
    return True


def _swap_approvals(engine: Any, policy: Any) -> None:
    engine.policy = policy
    if getattr(engine.webhooks, "hooks", None) == policy.webhooks:
        return
    from bastion.approvals.webhooks import Webhooks

    old, engine.webhooks = engine.webhooks, Webhooks(policy.webhooks, getattr(engine.webhooks, "link", None))
    task = asyncio.get_running_loop().create_task(old.close())
    engine._tasks.add(task)
    task.add_done_callback(engine._tasks.discard)
