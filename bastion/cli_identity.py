"""``bastion login / logout / whoami``, ``bastion lock / unlock`` and ``bastion sessions``.

Registered on the ``bastion`` group by bastion/cli.py (``register(main, cli_module)``), and
using its HTTP helpers, so that ``python -m bastion.cli`` and the console script agree.
"""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import click

from bastion.config import parse_duration
from recorder.units import human_size


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _ago(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def parse_until(text: str, now: float | None = None) -> float:
    """``--until``: a duration from now (``30m``, ``8h``, ``2d``) or a date and time
    (``2025-06-30T18:00``, local time unless it names a zone, e.g. ``...Z`` or ``+00:00``)."""
    now = time.time() if now is None else now
    try:
        return now + parse_duration(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise click.BadParameter(f"{text!r}: give a duration from now (30m, 8h, 2d) or a date and time "
                                 "(2025-06-30T18:00, local time, or with Z / +00:00)", param_hint="--until") from None
    return when.timestamp()


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in [header, *rows])


class _Shared:
    """What the commands that call the gateway share: two options and the API call (bastion/cli.py's helpers)."""

    def __init__(self, cli: ModuleType) -> None:
        self.cli = cli
        self.gateway = click.option("--gateway", help="Gateway HTTP API (default $GUARITA_URL or "
                                    f"{cli.DEFAULT_GATEWAY}).")
        self.token_file = click.option("--token-file", type=click.Path(path_type=Path),
                                       help="Read your token from this file (default: $GUARITA_TOKEN, "
                                            "$GUARITA_TOKEN_FILE, then your `bastion login`).")

    def token(self, token_file: Path | None) -> str:
        value = self.cli.obtain_token(token_file)
        if not value:
            raise click.ClickException(self.cli.NO_TOKEN)
        return str(value)

    def api(self, method: str, gateway: str | None, path: str, token_file: Path | None,
            body: dict[str, Any] | None = None) -> Any:
        return self.cli._api(method, self.cli._gateway_url(gateway) + path, self.token(token_file), body)


def register(main: click.Group, cli: ModuleType) -> None:
    """Add login, logout, whoami, lock (and lock ls), unlock and sessions (ls, kill) to ``main``."""
    shared = _Shared(cli)
    _add_login(main)
    _add_logout(main)
    _add_whoami(main, shared)
    _add_lock(main, shared)
    _add_unlock(main, shared)
    _add_sessions(main, shared)


# -- login -----------------------------------------------------------------------------------


def _add_login(main: click.Group) -> None:
    @main.command()
    @click.option("--issuer", help="Your identity provider (default $GUARITA_LOGIN_ISSUER or login.toml).")
    @click.option("--client-id", help="The public client registered for bastion (default "
                  "$GUARITA_LOGIN_CLIENT_ID or login.toml).")
    @click.option("--scope", help="Scopes to ask for (default 'openid offline_access').")
    @click.option("--audience", help="Audience / resource to ask for, for issuers that need one.")
    @click.option("--token-type", type=click.Choice(["access_token", "id_token"]),
                  help="Which token the gateway gets (default access_token, the ID token when the access token "
                       "is not a JWT).")
    @click.option("--timeout", help="Give up if the sign-in is not completed in this time (default: the code's "
                  "own lifetime), e.g. 5m.")
    def login(issuer: str | None, client_id: str | None, scope: str | None, audience: str | None,
              token_type: str | None, timeout: str | None) -> None:
        """Sign in with your identity provider (OIDC device flow) and cache the tokens.

        Shows an address and a code: open it in any browser, sign in, confirm the code. The
        tokens are cached in ~/.cache/guarita/token.json (mode 0600) and refreshed with the
        refresh token; `bastion token`, `bastion ssh-cert` and the other commands use them."""
        seconds = _timeout_seconds(timeout)
        settings, entry = _device_flow(issuer, client_id, scope, audience, token_type, seconds)
        click.echo(_logged_in(settings.issuer, entry), err=True)


def _timeout_seconds(timeout: str | None) -> float | None:
    if not timeout:
        return None
    try:
        return parse_duration(timeout)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timeout") from None


def _device_flow(issuer: str | None, client_id: str | None, scope: str | None, audience: str | None,
                 token_type: str | None, seconds: float | None) -> tuple[Any, dict[str, Any]]:
    """Run the device flow, saying where to sign in; returns the settings and the cached entry."""
    from bastion import login as lg

    try:
        settings = lg.load_settings(issuer, client_id, scope, audience, token_type)
        discovery = lg.discover(settings.issuer)
        start = lg.start_device_flow(settings, discovery)
        click.echo(_sign_in_prompt(start, seconds), err=True)
        tokens = lg.poll_for_tokens(settings, str(discovery.get("token_endpoint")), start, seconds)
        return settings, lg.save_login(settings, discovery, tokens)
    except lg.LoginError as exc:
        raise click.ClickException(str(exc)) from None
    except KeyboardInterrupt:
        raise click.ClickException("login cancelled; nothing was cached") from None


def _sign_in_prompt(start: dict[str, Any], seconds: float | None) -> str:
    from bastion import login as lg

    complete = start.get("verification_uri_complete")
    lines = ["To sign in, open this address in a browser:", f"  {complete or start['verification_uri']}"]
    if complete:
        lines.append(f"or open {start['verification_uri']} and enter the code {start['user_code']}")
    else:
        lines.append(f"and enter the code: {start['user_code']}")
    lifetime = float(start.get("expires_in") or 600)
    wait = min(seconds, lifetime) if seconds is not None else lifetime
    lines.append(f"Waiting for you to finish signing in (up to {lg._human(wait)}) ...")
    return "\n".join(lines)


def _logged_in(issuer: str, entry: dict[str, Any]) -> str:
    from bastion import login as lg
    from bastion.doors.kube.client import cache_path

    claims = lg.claims_of(lg.gateway_token(entry) or "")
    who = claims.get("email") or claims.get("sub") or "?"
    groups = claims.get("groups")
    extra = f", groups {', '.join(map(str, groups))}" if isinstance(groups, list) and groups else ""
    refresh = "refreshed automatically" if entry.get("refresh_token") else \
        "no refresh token: run `bastion login` again then"
    return (f"Logged in as {who} ({issuer}{extra}). Tokens cached in {cache_path()} (mode 0600); "
            f"the token is valid until {_when(entry.get('expires_at'))} and {refresh}.")


def _add_logout(main: click.Group) -> None:
    @main.command()
    def logout() -> None:
        """Forget your cached tokens (and revoke the refresh token at the issuer when it can)."""
        from bastion import login as lg
        from bastion.doors.kube.client import cache_path

        existed, problem = lg.logout()
        if problem:
            click.echo(f"bastion logout: warning: {problem}", err=True)
        click.echo(f"logged out: removed {cache_path()}" if existed else "not logged in: nothing to remove",
                   err=True)


def _add_whoami(main: click.Group, shared: _Shared) -> None:
    @main.command()
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @shared.gateway
    @shared.token_file
    def whoami(as_json: bool, gateway: str | None, token_file: Path | None) -> None:
        """Show the identity the gateway sees for your token: subject, groups, claims, roles, expiry."""
        me = shared.api("GET", gateway, "/v1/whoami", token_file)
        click.echo(json.dumps(me, indent=2) if as_json else _whoami_text(me))


def _whoami_text(me: dict[str, Any]) -> str:
    expires = float(me.get("expires_at") or 0)
    left = expires - time.time()
    claims = ", ".join(f"{k}={v}" for k, v in sorted((me.get("claims") or {}).items())) or "-"
    lines = [f"subject  {me['subject']}", f"issuer   {me['issuer']}", f"email    {me.get('email') or '-'}",
             f"groups   {', '.join(me.get('groups') or []) or '-'}", f"claims   {claims}",
             *([f"acting   {' via '.join([me['subject'], *(str(a.get('sub')) for a in reversed(me['act']))])} "
                f"(delegated: {len(me['act'])} actor(s); a delegated token can never approve)"]
               if me.get("act") else []),
             f"roles    {', '.join(me.get('roles') or []) or '-'}",
             f"expires  {_when(expires)} ({'in ' + _ago(left) if left > 0 else 'expired'})"]
    return "\n".join(lines)


# -- locks -----------------------------------------------------------------------------------


def _add_lock(main: click.Group, shared: _Shared) -> None:
    @main.group(invoke_without_command=True)
    @click.option("--subject", help="Lock an identity by subject (or e-mail).")
    @click.option("--group", "group_name", help="Lock every identity in a group.")
    @click.option("--target", help="Lock a target (an SSH target or a Kubernetes cluster, by name).")
    @click.option("--claim", help="Lock identities with a claim NAME=VALUE (e.g. repository=org/app).")
    @click.option("--until", "until_text", help="Lift it by itself: a duration (30m, 8h) or a date and time.")
    @click.option("--reason", help="Why: shown to the users whose sessions end, kept for auditors.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @shared.gateway
    @shared.token_file
    @click.pass_context
    def lock(ctx: click.Context, subject: str | None, group_name: str | None, target: str | None,
             claim: str | None, until_text: str | None, reason: str | None, as_json: bool, gateway: str | None,
             token_file: Path | None) -> None:
        """Refuse new sessions of a subject, group, target or claim at once, and end its live sessions
        on every replica (operators). `bastion lock ls` lists locks; `bastion unlock ID` lifts one."""
        if ctx.invoked_subcommand is not None:
            return
        kind, value = _lock_what(subject, group_name, target, claim, reason)
        until = parse_until(until_text) if until_text else None
        answer = shared.api("POST", gateway, "/v1/locks", token_file,
                            {"kind": kind, "value": value, "reason": reason, "until": until})
        click.echo(json.dumps(answer, indent=2) if as_json else _locked_text(answer, kind, value))

    _add_lock_ls(lock, shared)


def _lock_what(subject: str | None, group_name: str | None, target: str | None, claim: str | None,
               reason: str | None) -> tuple[str, str]:
    """The one thing to lock (kind, value); a usage error unless exactly one is given, with a reason."""
    chosen = [(k, v) for k, v in (("subject", subject), ("group", group_name), ("target", target),
                                  ("claim", claim)) if v]
    if len(chosen) != 1:
        raise click.UsageError("give exactly one of --subject, --group, --target or --claim (or `bastion lock "
                               "ls`)")
    if not reason or not reason.strip():
        raise click.UsageError("--reason is required: it is shown to the users whose sessions end")
    return chosen[0]


def _locked_text(answer: dict[str, Any], kind: str, value: str) -> str:
    lk = answer["lock"]
    lasts = f"until {_when(lk['until'])}" if lk.get("until") else f"until `bastion unlock {lk['id']}`"
    lines = [f"lock {lk['id']}: {kind} {value} is locked {lasts}: new sessions are refused"]
    n = int(answer.get("live_sessions") or 0)
    if n:
        lines.append(f"{n} live session(s) matched and are being ended on every replica")
    else:
        lines.append("no live session matches it now")
    if not answer.get("known", True):
        lines.append(f"note: subject {value} has not been seen by this gateway; the lock pre-empts a future "
                     "login")
    return "\n".join(lines)


def _add_lock_ls(lock: click.Group, shared: _Shared) -> None:
    @lock.command("ls")
    @click.option("--all", "show_all", is_flag=True, help="Also lifted and expired locks.")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @shared.gateway
    @shared.token_file
    def lock_ls(show_all: bool, as_json: bool, gateway: str | None, token_file: Path | None) -> None:
        """List locks in force (operators and auditors)."""
        answer = shared.api("GET", gateway, "/v1/locks" + ("?all=1" if show_all else ""), token_file)
        rows = answer["locks"]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        elif not rows:
            click.echo("no locks in force" if not show_all else "no locks", err=True)
        else:
            click.echo(_locks_table(rows))


def _locks_table(rows: list[dict[str, Any]]) -> str:
    table = []
    for r in rows:
        state = "active" if r["active"] else ("lifted " + _when(r["removed"]) if r.get("removed") else "expired")
        by = r["created_by"].get("email") or r["created_by"].get("subject") or "?"
        table.append([r["id"], r["kind"], r["value"], _when(r["created"]),
                      _when(r["until"]) if r.get("until") else "-", state, by, r["reason"]])
    return _table(table, ["ID", "KIND", "VALUE", "CREATED", "UNTIL", "STATE", "BY", "REASON"])


def _add_unlock(main: click.Group, shared: _Shared) -> None:
    @main.command()
    @click.argument("lock_id")
    @shared.gateway
    @shared.token_file
    def unlock(lock_id: str, gateway: str | None, token_file: Path | None) -> None:
        """Lift a lock (operators): new sessions that it refused may open again."""
        answer = shared.api("DELETE", gateway, f"/v1/locks/{lock_id}", token_file)
        lk = answer["lock"]
        click.echo(f"lock {lk['id']} lifted: {lk['kind']} {lk['value']} may connect again")


# -- live sessions ---------------------------------------------------------------------------


def _add_sessions(main: click.Group, shared: _Shared) -> None:
    @main.group()
    def sessions() -> None:
        """Live sessions across replicas: list them, end one (operators; auditors may list)."""

    _add_sessions_ls(sessions, shared)
    _add_sessions_kill(sessions, shared)


def _add_sessions_ls(sessions: click.Group, shared: _Shared) -> None:
    @sessions.command("ls")
    @click.option("--json", "as_json", is_flag=True, help="Print JSON.")
    @shared.gateway
    @shared.token_file
    def sessions_ls(as_json: bool, gateway: str | None, token_file: Path | None) -> None:
        """List live sessions on every replica: id, replica, who, where, since, bytes in and out
        (updated every few seconds), pending approvals."""
        answer = shared.api("GET", gateway, "/v1/sessions", token_file)
        rows = answer["sessions"]
        if as_json:
            click.echo(json.dumps(rows, indent=2))
        elif not rows:
            click.echo("no live sessions", err=True)
        else:
            click.echo(_sessions_table(rows, float(answer.get("now") or time.time())))

    sessions.add_command(sessions_ls, "list")


def _sessions_table(rows: list[dict[str, Any]], now: float) -> str:
    table = []
    for r in rows:
        where = f"{r['login']}@{r['target']}" if r.get("login") else str(r.get("target"))
        what = r.get("command") or r.get("kind") or ""
        what = what if len(what) <= 40 else what[:37] + "..."
        table.append([r["id"], str(r.get("replica") or "?"), str(r.get("email") or r.get("subject")),
                      f"{where} ({r.get('front_door')})", what,
                      f"{_when(r.get('started'))} ({_ago(now - float(r.get('started') or now))})",
                      human_size(r.get("bytes_in"), sep=""), human_size(r.get("bytes_out"), sep=""), str(r.get("pending_approvals") or 0)])
    return _table(table, ["ID", "REPLICA", "WHO", "WHERE", "WHAT", "SINCE", "IN", "OUT", "PENDING"])


def _add_sessions_kill(sessions: click.Group, shared: _Shared) -> None:
    @sessions.command("kill")
    @click.argument("session_id")
    @click.option("--reason", required=True, help="Why: shown to the user and kept in the recording.")
    @shared.gateway
    @shared.token_file
    def sessions_kill(session_id: str, reason: str, gateway: str | None, token_file: Path | None) -> None:
        """End a live session on whichever replica holds it (operators)."""
        answer = shared.api("POST", gateway, f"/v1/sessions/{session_id}/kill", token_file, {"reason": reason})
        s = answer["session"]
        who = s.get("email") or s.get("subject") or "?"
        click.echo(f"session {session_id} ({who} on {s.get('target') or '?'}) is being ended: {reason}")
