"""The ``replay`` command: list, print, play and verify recorded sessions."""

from __future__ import annotations

import json
import re
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from recorder.signing import load_public_key
from recorder.store import RecordingStore, StoreError, open_store
from replay.reader import ReplayError, SessionSummary, iter_events, list_sessions, open_session
from replay.verify import verify_session

_ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)|[()][0-9A-Za-z]|[=>78DEHMc])")


class Context:
    def __init__(self, config: Path | None, recordings: str | None, data_dir: Path | None) -> None:
        self.config, self.recordings, self.data_dir = config, recordings, data_dir
        self._store: RecordingStore | None = None

    def store(self) -> RecordingStore:
        if self._store is None:
            self._store = open_store(self._url())
        return self._store

    def _url(self) -> str:
        if self.recordings:
            return self.recordings
        if self.config:
            from bastion.config import ConfigError, load_config

            try:
                return load_config(self.config).recording.url
            except ConfigError as exc:
                raise click.ClickException(f"{self.config}: {exc}") from None
        data_dir = self.data_dir or Path("guarita-data")
        folder = data_dir / "recordings"
        if not folder.is_dir():
            raise click.ClickException(f"no recordings in {folder}: pass --recordings URL, --config FILE or "
                                       "--data-dir DIR (or run replay where `bastion serve --dev` ran)")
        return folder.resolve().as_uri()

    def trusted_key(self, public_key: str | None) -> bytes | None:
        if public_key:
            text = Path(public_key).read_text() if Path(public_key).exists() else public_key
            try:
                return load_public_key(text)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--public-key") from None
        key_file = None
        if self.config:
            from bastion.config import load_config

            key_file = load_config(self.config).recording.key_file
        elif self.data_dir:
            key_file = self.data_dir / "recording_key.pem"
        if key_file and key_file.exists():
            from recorder.signing import RecordingKey

            return RecordingKey.load_or_create(key_file).public_raw
        return None


def _fail(message: str) -> None:
    click.echo(f"replay: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", type=click.Path(path_type=Path), help="The gateway's config file (finds its recordings).")
@click.option("--recordings", help="Recordings URL: file:///PATH or s3://BUCKET/PREFIX.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="A `bastion serve --dev` data folder.")
@click.pass_context
def main(ctx: click.Context, config: Path | None, recordings: str | None, data_dir: Path | None) -> None:
    """Find, read, play and verify recorded sessions."""
    ctx.obj = Context(config, recordings, data_dir)


def _parse_since(value: str | None) -> datetime | None:
    if not value:
        return None
    from bastion.config import parse_duration

    try:
        return datetime.fromtimestamp(time.time() - parse_duration(value), UTC)
    except ValueError:
        pass
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise click.BadParameter("use a duration (2h, 3d) or an ISO date", param_hint="--since") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _sessions(ctx: Context, since: str | None, subject: str | None, target: str | None) -> list[SessionSummary]:
    since_dt = _parse_since(since)
    try:
        found = list(list_sessions(ctx.store(), since_dt))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    return [s for s in found
            if (since_dt is None or s.started_at >= since_dt)
            and (subject is None or subject in (s.identity.get("subject"), s.identity.get("email")))
            and (target is None or s.meta.get("target") == target)]


@main.command("ls")
@click.option("--since", help="Only sessions started in the last DURATION (2h, 3d) or since an ISO date.")
@click.option("--subject", help="Only this subject (or e-mail).")
@click.option("--target", help="Only this target.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@click.pass_obj
def ls(ctx: Context, since: str | None, subject: str | None, target: str | None, as_json: bool) -> None:
    """List recorded sessions."""
    sessions = _sessions(ctx, since, subject, target)
    if as_json:
        for s in sessions:
            click.echo(json.dumps(s.to_dict(), ensure_ascii=False))
        return
    rows = [("ID", "STARTED (UTC)", "SUBJECT", "TARGET", "KIND", "EXIT", "STATE", "COMMAND")]
    for s in sessions:
        login = s.meta.get("login")
        where = f"{login}@{s.meta.get('target')}" if login else str(s.meta.get("target"))
        status = s.exit_status
        rows.append((s.id, s.started_at.strftime("%Y-%m-%d %H:%M:%S"), str(s.identity.get("subject", "?")), where,
                     str(s.meta.get("kind", "?")) + ("/tty" if s.meta.get("tty") else ""),
                     "-" if status is None else str(status), s.state, _short(s.meta.get("command") or "")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1])
    if len(rows) == 1:
        click.echo("(no sessions)", err=True)


def _short(text: str, limit: int = 50) -> str:
    text = text.replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _open(ctx: Context, ref: str) -> SessionSummary:
    try:
        return open_session(ctx.store(), ref)
    except (ReplayError, StoreError) as exc:
        _fail(str(exc))
        raise AssertionError from None


@main.command()
@click.argument("session")
@click.option("--raw", is_flag=True, help="Keep terminal escape sequences.")
@click.option("--input", "show_input", is_flag=True, help="Also show what was typed, marked with ⌨.")
@click.pass_obj
def cat(ctx: Context, session: str, raw: bool, show_input: bool) -> None:
    """Print what the session printed (stdout to stdout, stderr to stderr)."""
    summary = _open(ctx, session)
    out, err = sys.stdout.buffer, sys.stderr.buffer
    try:
        for event in iter_events(ctx.store(), summary):
            data = event.stream_bytes()
            if data is None:
                if event.code == "m" and event.data.get("type") == "hidden-input" and show_input:
                    err.write(f"⌨ [hidden input, {event.data.get('length')} bytes]\n".encode())
                continue
            stream = event.stream
            if stream == "i" and not show_input:
                continue
            if not raw:
                data = _ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n").encode()
            if stream == "i":
                err.write(b"\xe2\x8c\xa8 " + data + b"\n")
            else:
                (err if stream == "e" else out).write(data)
    except ReplayError as exc:
        out.flush()
        _fail(str(exc))
    out.flush()
    if not summary.complete:
        click.echo(f"replay: session {summary.id} is still running or was never sealed; shown up to its last "
                   "uploaded segment", err=True)


@main.command()
@click.argument("session")
@click.option("--speed", default=1.0, show_default=True, help="Playback speed factor.")
@click.option("--idle-limit", type=float, help="Cap pauses at this many seconds.")
@click.pass_obj
def play(ctx: Context, session: str, speed: float, idle_limit: float | None) -> None:
    """Play the session in real time in this terminal."""
    if speed <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--speed")
    summary = _open(ctx, session)
    out = sys.stdout.buffer
    start = time.monotonic()
    clock = 0.0  # recording time already played
    last_t = 0.0
    try:
        for event in iter_events(ctx.store(), summary):
            if event.stream not in ("o", "e"):
                continue
            gap = event.t - last_t
            if idle_limit is not None:
                gap = min(gap, idle_limit)
            clock += gap
            last_t = event.t
            delay = start + clock / speed - time.monotonic()
            if delay > 0:
                out.flush()
                time.sleep(delay)
            out.write(event.stream_bytes() or b"")
    except ReplayError as exc:
        out.flush()
        _fail(str(exc))
    except KeyboardInterrupt:
        pass
    out.flush()


@main.command()
@click.argument("session", required=False)
@click.option("--all", "all_", is_flag=True, help="Verify every session (with --since, those since).")
@click.option("--since", help="With --all: only sessions started in the last DURATION or since a date.")
@click.option("--public-key", help="Trusted recording public key (PEM file or base64), see `bastion keys`.")
@click.option("--lock-mode", type=click.Choice(["COMPLIANCE", "GOVERNANCE"]), help="Expected Object Lock mode.")
@click.pass_obj
def verify(ctx: Context, session: str | None, all_: bool, since: str | None, public_key: str | None,
           lock_mode: str | None) -> None:
    """Check hashes, chain, signature and retention; exit 1 at the first broken recording."""
    if bool(session) == all_:
        raise click.UsageError("give a SESSION or --all")
    trusted = ctx.trusted_key(public_key)
    targets = _sessions(ctx, since, None, None) if all_ else [_open(ctx, session or "")]
    failed = 0
    warned: set[str] = set()
    for summary in targets:
        result = verify_session(ctx.store(), summary, trusted, lock_mode)
        for warning in result.warnings:
            if warning not in warned:
                warned.add(warning)
                click.echo(f"warning: {warning}", err=True)
        if result.ok:
            click.echo(f"{summary.id}: OK ({result.segments} segments)")
        else:
            failed += 1
            click.echo(f"{summary.id}: FAILED: {result.problems[0]}")
    if all_:
        click.echo(f"{len(targets) - failed} verified, {failed} failed", err=True)
    sys.exit(1 if failed else 0)


def _json_default(value: Any) -> str:
    return str(value)


if __name__ == "__main__":
    main()
