"""The ``replay`` command: list, print, play and verify recorded sessions."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click

from bastion.cli_group import AliasGroup
from recorder.signing import load_public_key
from recorder.store import RecordingStore, StoreError, open_store
from replay.cli_index import state_option
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

    def trusted_keys(self, public_keys: tuple[str, ...]) -> tuple[bytes, ...]:
        """The keyring from --public-key (each a PEM file, base64, or a folder of key files),
        else the key the config or data folder names; empty when there is none."""
        if public_keys:
            return tuple(key for value in public_keys for key in _load_keys(value))
        key_file = None
        if self.config:
            from bastion.config import load_config

            key_file = load_config(self.config).recording.key_file
        elif self.data_dir:
            key_file = self.data_dir / "recording_key.pem"
        elif not self.recordings:
            # No flag: the folder where `bastion serve --dev` ran, as for the recordings.
            key_file = Path("guarita-data") / "recording_key.pem"
        if key_file and key_file.exists():
            from recorder.signing import RecordingKey

            return (RecordingKey.load_or_create(key_file).public_raw,)
        return ()


def _load_keys(value: str) -> list[bytes]:
    path = Path(value)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else []
    if path.is_dir() and not files:
        raise click.BadParameter(f"{value}: the folder holds no key files", param_hint="--public-key")
    try:
        if files:
            return [load_public_key(f.read_text()) for f in files]
        return [load_public_key(path.read_text() if path.is_file() else value)]
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        raise click.BadParameter(f"{value}: {exc}", param_hint="--public-key") from None


PUBLIC_KEY_HELP = ("Trusted recording public key: a PEM file, base64, or a folder of key files (a keyring across "
                   "rotations); repeatable. See `bastion keys`.")


def pass_store(fn: Any) -> Any:
    """Like click.pass_obj, and also takes --config/--recordings/--data-dir after the
    command (`replay ls --data-dir DIR`), as people type them."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, config_: Path | None = None, recordings_: str | None = None,
                data_dir_: Path | None = None, **kw: Any) -> Any:
        obj = click.get_current_context().find_object(Context)
        assert obj is not None
        obj.config = config_ or obj.config
        obj.recordings = recordings_ or obj.recordings
        obj.data_dir = data_dir_ or obj.data_dir
        return fn(obj, *args, **kw)

    wrapper = click.option("--data-dir", "data_dir_", type=click.Path(path_type=Path),
                           help="A `bastion serve --dev` data folder.")(wrapper)
    wrapper = click.option("--recordings", "recordings_", help="Recordings URL: file:///PATH or s3://BUCKET/PREFIX.")(wrapper)
    wrapper = click.option("--config", "config_", type=click.Path(path_type=Path),
                           help="The gateway's config file (finds its recordings and key).")(wrapper)
    return wrapper


def _fail(message: str) -> None:
    click.echo(f"replay: {message}", err=True)
    sys.exit(1)


@click.group(cls=AliasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="guarita", prog_name="replay")
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


def _sessions(ctx: Context, f: Filters, state_url: str | None = None) -> list[SessionSummary]:
    if state_url:
        from replay import cli_index

        return cli_index.sessions(state_url, f)
    try:
        found = list(list_sessions(ctx.store(), f.since))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    chosen = [s for s in found if f.match(s)]
    if f.approved:  # the markers' counts say an approval was asked; the events say how it ended
        chosen = [s for s in chosen if _had_approved_command(ctx, s)]
    return chosen


def _had_approved_command(ctx: Context, summary: SessionSummary) -> bool:
    """A command ran after approval (not denied, expired or cancelled)."""
    try:
        return any(e.code == "m" and isinstance(e.data, dict) and e.data.get("type") == "command"
                   and e.data.get("outcome") == "approved" for e in iter_events(ctx.store(), summary))
    except (ReplayError, StoreError) as exc:
        click.echo(f"replay: {summary.id}: {exc} (not counted as approved)", err=True)
        return False


class Filters:
    """The session filters shared by ls, search and verify --all."""

    def __init__(self, since: str | None = None, until: str | None = None, subject: str | None = None,
                 group: str | None = None, target: str | None = None, login: str | None = None,
                 exit_status: int | None = None, approved: bool = False, masked: bool = False,
                 command: str | None = None) -> None:
        self.since, self.until = _parse_since(since), _parse_since(until)
        self.subject, self.group, self.target, self.login = subject, group, target, login
        self.exit_status, self.approved, self.masked, self.command = exit_status, approved, masked, command

    def match(self, s: SessionSummary) -> bool:
        markers = s.end.get("markers") or {}
        return ((self.since is None or s.started_at >= self.since)
                and (self.until is None or s.started_at <= self.until)
                and (self.subject is None or self.subject in (s.identity.get("subject"), s.identity.get("email"),
                                                              *s.actors))
                and (self.group is None or self.group in (s.identity.get("groups") or []))
                and (self.target is None or self.target in (s.meta.get("target"), s.meta.get("cluster")))
                and (self.login is None or s.meta.get("login") == self.login)
                and (self.exit_status is None or s.exit_status == self.exit_status)
                and (not self.approved or any(k.startswith("approval") for k in markers))
                and (not self.masked or any(k.startswith("mask") for k in markers))
                and (self.command is None or self.command in (s.meta.get("command") or "")))


def filter_options(fn: Any) -> Any:
    options = [
        click.option("--since", help="Started in the last DURATION (2h, 3d) or since an ISO date."),
        click.option("--until", help="Started before DURATION ago or before an ISO date."),
        click.option("--subject", help="This subject (or e-mail), or an actor of its delegation chain."),
        click.option("--group", help="An identity in this group."),
        click.option("--target", help="This target (or cluster)."),
        click.option("--login", help="This login."),
        click.option("--exit", "exit_status", type=int, help="This exit status."),
        click.option("--approved", is_flag=True, help="Ran a command after its approval was granted (not denied, "
                     "expired or cancelled)."),
        click.option("--masked", is_flag=True, help="Had masking."),
        click.option("--command", help="Exec command containing this text."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _filters(kw: dict[str, Any]) -> Filters:
    names = ("since", "until", "subject", "group", "target", "login", "exit_status", "approved", "masked", "command")
    return Filters(**{n: kw.pop(n) for n in names})


@main.command("ls")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@state_option
@pass_store
def ls(ctx: Context, as_json: bool, state_url: str | None, **kw: Any) -> None:
    """List recorded sessions."""
    sessions = _sessions(ctx, _filters(kw), state_url)
    if as_json:
        for s in sessions:
            click.echo(json.dumps(s.to_dict(), ensure_ascii=False))
        return
    rows = [("ID", "STARTED (UTC)", "SUBJECT", "TARGET", "KIND", "EXIT", "STATE", "MASKED", "COMMAND")]
    for s in sessions:
        login = s.meta.get("login")
        where = f"{login}@{s.meta.get('target')}" if login else str(s.meta.get("target"))
        status = s.exit_status
        masked = " ".join(f"{k}:{v}" for k, v in sorted((s.end.get("masking") or {}).items()) if v) or "-"
        rows.append((s.id, s.started_at.strftime("%Y-%m-%d %H:%M:%S"), s.who, where,
                     str(s.meta.get("kind", "?")) + ("/tty" if s.meta.get("tty") else ""),
                     "-" if status is None else str(status), s.state, masked, _short(s.meta.get("command") or "")))
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
@click.option("--input", "show_input", is_flag=True, help="Also show what was typed, marked with ⌨, on stdout "
              "between the output it came with.")
@click.option("--commands", "show_commands", is_flag=True, help="List commands with times and approval outcome.")
@pass_store
def cat(ctx: Context, session: str, raw: bool, show_input: bool, show_commands: bool) -> None:
    """Print what the session printed (stdout to stdout, stderr to stderr)."""
    summary = _open(ctx, session)
    if show_commands:
        _print_commands(ctx, summary)
        return
    out, err = sys.stdout.buffer, sys.stderr.buffer
    try:
        for event in iter_events(ctx.store(), summary):
            data = event.stream_bytes()
            if data is None:
                if event.code == "m" and event.data.get("type") == "hidden-input" and show_input:
                    out.write(f"⌨ [hidden input, {event.data.get('length')} bytes]\n".encode())
                continue
            stream = event.stream
            if stream == "i" and not show_input:
                continue
            if not raw:
                data = _ANSI.sub("", data.decode("utf-8", "replace")).replace("\r\n", "\n").encode()
            if stream == "i":
                # Typed input goes with the output it came between, on stdout (a pipe keeps the order).
                out.write(b"\xe2\x8c\xa8 " + data + b"\n")
            else:
                if stream == "e":
                    out.flush()
                (err if stream == "e" else out).write(data)
    except ReplayError as exc:
        out.flush()
        _fail(str(exc))
    out.flush()
    if not summary.complete:
        click.echo(f"replay: session {summary.id} is still running or was never sealed; shown up to its last "
                   "uploaded segment", err=True)


def parse_offset(value: str) -> float:
    """``12m30s``, ``1h2m``, ``90``, ``90.5s`` or ``12:30`` -> seconds."""
    value = value.strip()
    if ":" in value:
        total = 0.0
        for part in value.split(":"):
            total = total * 60 + float(part)
        return total
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms]?)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise click.BadParameter(f"use a time like 12m30s, 1h2m, 90s or 12:30, got {value!r}")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1, "": 1}[u] for n, u in parts)


@main.command()
@click.argument("session")
@click.option("--speed", default=1.0, show_default=True, help="Playback speed factor.")
@click.option("--idle-limit", type=float, help="Cap pauses at this many seconds.")
@click.option("--from", "from_", help="Start at this time (12m30s, 90s, 1:02:03).")
@pass_store
def play(ctx: Context, session: str, speed: float, idle_limit: float | None, from_: str | None) -> None:
    """Play the session in real time. Keys: space pause, arrows ±10s, ] next marker, +/- speed, q quit."""
    from replay.player import Player, open_keys

    if speed <= 0:
        raise click.BadParameter("must be more than 0", param_hint="--speed")
    start = parse_offset(from_) if from_ else 0.0
    summary = _open(ctx, session)
    _warn_size(summary)
    player = Player(ctx.store(), summary, sys.stdout.buffer, speed, idle_limit)
    if player.duration and start > player.duration:
        raise click.BadParameter(f"{from_} is past the end of session {summary.id}, which lasts "
                                 f"{format_offset(player.duration)}", param_hint="--from")
    length = f"{format_offset(player.duration)} long" if player.duration else "still running or never sealed"
    click.echo(f"replay: {summary.id}, {length}: playing from {format_offset(start)} at speed x{speed:g}", err=True)
    keys = open_keys()
    try:
        player.play(start, keys)
    except ReplayError as exc:
        sys.stdout.buffer.flush()
        _fail(str(exc))
    except KeyboardInterrupt:
        pass
    finally:
        if keys is not None:
            keys.close()
            sys.stdout.buffer.write(b"\x1b[0m\r\n")
            sys.stdout.buffer.flush()


def _warn_size(summary: SessionSummary) -> None:
    import shutil

    term = summary.meta.get("term") or {}
    if not term or not sys.stdout.isatty():
        return
    size = shutil.get_terminal_size()
    if size.columns < int(term.get("cols", 0)) or size.lines < int(term.get("rows", 0)):
        click.echo(f"replay: the recording is {term['cols']}x{term['rows']} and this terminal is "
                   f"{size.columns}x{size.lines}: lines may wrap (enlarge the window)", err=True)


@main.command()
@click.argument("session")
@click.option("--format", "fmt", type=click.Choice(["asciicast-v2", "asciicast-v3", "json", "text"]),
              default="asciicast-v2", show_default=True, help="asciicast for asciinema, JSON events, or plain text.")
@click.option("-o", "--output", type=click.Path(path_type=Path), help="Output file (default stdout).")
@pass_store
def export(ctx: Context, session: str, fmt: str, output: Path | None) -> None:
    """Export a session (asciicast v2 plays in asciinema 2.2: `asciinema play FILE`)."""
    from replay.asciicast import WRITERS

    summary = _open(ctx, session)
    events = progress_events(ctx, summary, "exporting" if output else None)
    try:
        if output:
            tmp = output.with_name(output.name + ".part")
            with open(tmp, "w", encoding="utf-8") as f:
                WRITERS[fmt](summary, events, f)
            tmp.rename(output)
            click.echo(f"{summary.id} exported to {output} ({fmt})", err=True)
        else:
            WRITERS[fmt](summary, events, sys.stdout)
    except ReplayError as exc:
        _fail(f"{exc} (export stopped there)")


@main.command()
@click.argument("pattern")
@filter_options
@click.option("--commands-only", is_flag=True, help="Search commands only, not output.")
@click.option("-i", "--ignore-case", is_flag=True, help="Match upper and lower case alike.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per hit.")
@click.option("--no-skip", is_flag=True,
              help="Read every segment, even those whose search summary says they cannot match.")
@state_option
@pass_store
def search(ctx: Context, pattern: str, commands_only: bool, ignore_case: bool, as_json: bool, no_skip: bool,
           state_url: str | None, **kw: Any) -> None:
    """Find commands and output lines matching PATTERN (a regex) across sessions."""
    from replay.search import search_session

    try:
        regex = re.compile(pattern, re.IGNORECASE if ignore_case else 0)
    except re.error as exc:
        raise click.BadParameter(f"not a valid regular expression: {exc}", param_hint="PATTERN") from None
    filters: Filters | _Found = _filters(kw)
    if state_url and commands_only:
        from replay import cli_index

        filters = _Found(cli_index.command_hits(state_url, filters, regex))  # type: ignore[arg-type]
    _report(ctx, filters, lambda summary: search_session(ctx.store(), summary, regex, commands_only, not no_skip),
            lambda hit: f"{hit.session}  {format_offset(hit.t):>9}  {hit.kind:<7}  {hit.text}", as_json, "(no matches)",
            state_url)


class _Found:
    """Hits the archive index already found: _report prints them as they are."""

    def __init__(self, hits: list[Any]) -> None:
        self.hits = hits


def _report(ctx: Context, filters: Filters | _Found, find: Callable[[SessionSummary], Iterator[Any]],
            line: Callable[[Any], str], as_json: bool, nothing: str, state_url: str | None = None) -> None:
    """Hits across the sessions the filters select, a line (or JSON object) each; exit 1
    when there are none. A session that cannot be read is said so and skipped."""
    hits = 0
    if isinstance(filters, _Found):
        for hit in filters.hits:
            hits += 1
            click.echo(json.dumps(hit.__dict__, ensure_ascii=False) if as_json else line(hit))
        selected: list[SessionSummary] = []
    else:
        selected = _sessions(ctx, filters, state_url)
    for summary in progress(selected, "searching"):
        try:
            for hit in find(summary):
                hits += 1
                click.echo(json.dumps(hit.__dict__, ensure_ascii=False) if as_json else line(hit))
        except ReplayError as exc:
            click.echo(f"replay: {summary.id}: {exc} (searched up to there)", err=True)
    if not hits:
        click.echo(nothing, err=True)
        sys.exit(1)


@main.command()
@click.argument("hmac")
@filter_options
@click.option("--json", "as_json", is_flag=True, help="One JSON object per place.")
@state_option
@pass_store
def masked(ctx: Context, hmac: str, as_json: bool, state_url: str | None, **kw: Any) -> None:
    """Where the value with keyed hash HMAC was masked, across sessions.

    HMAC is what `bastion mask-hash DETECTOR VALUE` prints: the value itself is never
    stored, so this answers "was this CPF shown, and where was it masked?" from the
    recordings alone. (`kubectl logs` is not recorded: its values are in the audit log's
    `kube.logs.masked` events.)
    """
    from replay.search import masked_in_session

    hmac = hmac.strip().lower()
    if not re.fullmatch(r"[0-9a-f]{64}", hmac):
        raise click.BadParameter("a keyed hash is 64 hex digits: get it with `bastion mask-hash DETECTOR VALUE`",
                                 param_hint="HMAC")
    kw["masked"] = True  # only sessions that had masking can hold it
    filters: Filters | _Found = _filters(kw)
    if state_url:
        from replay import cli_index

        filters = _Found(cli_index.mask_hits(state_url, filters, hmac))
    _report(ctx, filters, lambda summary: masked_in_session(ctx.store(), summary, hmac),
            lambda hit: (f"{hit.session}  {format_offset(hit.t):>9}  {hit.stream}  {hit.detector:<10}  "
                         f"bytes {hit.offset}-{hit.offset + hit.length}"), as_json, "(not masked in any session searched)")


@main.command()
@filter_options
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The package to write (.tar.gz).")
@click.option("--public-key", "public_keys", multiple=True, help=PUBLIC_KEY_HELP)
@pass_store
def evidence(ctx: Context, output: Path, public_keys: tuple[str, ...], **kw: Any) -> None:
    """One package of the sessions the filters select, for an auditor or a regulator.

    The stored objects as they are (re-checkable with `replay verify`), a transcript, an
    asciicast file and the commands and approvals of each session, and an index (CSV and
    JSON) of who, when, where, what, under whose approval, masking counts and the
    verification result. Give at least one filter: `--subject ci-bot --since 30d`.
    """
    from replay.evidence import write_package

    chosen = {k: v for k, v in kw.items() if v not in (None, False)}
    if not chosen:
        raise click.UsageError("give at least one filter (--subject, --target, --since ...): an evidence package "
                               "is about someone, something or some time")
    selection = " ".join(f"--{k.replace('_', '-')}" + ("" if v is True else f" {v}") for k, v in chosen.items())
    sessions = _sessions(ctx, _filters(kw))
    if not sessions:
        _fail(f"no sessions match {selection}")
    if output.parent and not output.parent.is_dir():
        raise click.BadParameter(f"{output.parent} is not a folder", param_hint="--output")
    try:
        ok, failed = write_package(ctx.store(), sessions, output, ctx.trusted_keys(public_keys), selection)
    except (StoreError, OSError) as exc:
        _fail(f"cannot write the package: {exc}")
    click.echo(f"{output}: {len(sessions)} sessions, {ok} verified OK, {failed} with problems (see index.json)")
    if failed:
        sys.exit(1)


def format_offset(t: float) -> str:
    minutes, seconds = divmod(t, 60)
    hours, minutes = divmod(int(minutes), 60)
    return (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes or hours else "") + f"{seconds:.1f}s"


@main.command()
@click.argument("session")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between polls of the store.")
@click.option("--timeout", type=float, help="Give up after this many seconds without the session ending.")
@pass_store
def watch(ctx: Context, session: str, interval: float, timeout: float | None) -> None:
    """Follow a live session as its segments reach the store (a few seconds behind)."""
    from recorder.segment import parse_segment
    from recorder.store import NotFound, session_prefix

    summary = _open(ctx, session)
    prefix = session_prefix(summary.id)
    out = sys.stdout.buffer
    index = 0
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        key = f"{prefix}seg-{index:06d}.zst"
        try:
            _, events = parse_segment(ctx.store().get(key), key)
        except NotFound:
            try:
                ctx.store().get(prefix + "manifest.json")
                break  # ended, and every segment has been shown
            except NotFound:
                pass
            if deadline and time.monotonic() > deadline:
                _fail(f"session {summary.id} still running after {timeout:g}s")
            time.sleep(interval)
            continue
        except (StoreError, ReplayError) as exc:
            _fail(str(exc))
        for event in events:
            if event.stream in ("o", "e"):
                out.write(event.stream_bytes() or b"")
        out.flush()
        index += 1
    click.echo(f"\nreplay: session {summary.id} ended", err=True)


def progress(items: list[Any], label: str) -> Iterator[Any]:
    """Yield items, drawing a progress bar on stderr when it is a terminal (quiet in pipes)."""
    if not sys.stderr.isatty() or len(items) < 2:
        yield from items
        return
    with click.progressbar(items, label=label, file=sys.stderr) as bar:
        yield from bar


def progress_events(ctx: Context, summary: SessionSummary, label: str | None) -> Iterator[Any]:
    if label is None or not sys.stderr.isatty():
        yield from iter_events(ctx.store(), summary)
        return
    keys = len((summary.manifest or {}).get("segments") or []) or 1
    bar: Any
    with click.progressbar(length=keys, label=label, file=sys.stderr) as bar:
        yield from iter_events(ctx.store(), summary)
        bar.update(keys)


@main.command()
@click.argument("session", required=False)
@click.option("--all", "all_", is_flag=True, help="Verify every session (with --since, those since).")
@click.option("--since", help="With --all: only sessions started in the last DURATION or since a date.")
@click.option("--public-key", "public_keys", multiple=True, help=PUBLIC_KEY_HELP)
@click.option("--lock-mode", type=click.Choice(["COMPLIANCE", "GOVERNANCE"]), help="Expected Object Lock mode.")
@click.option("--no-trusted-key", "untrusted_ok", is_flag=True,
              help="Without a trusted public key, check hashes, chain and retention and the signature against "
                   "the manifest's own key only (a forger who can write the bucket can re-sign), and exit 0 when "
                   "they hold. Without this flag such a recording is UNVERIFIED (exit 1).")
@pass_store
def verify(ctx: Context, session: str | None, all_: bool, since: str | None, public_keys: tuple[str, ...],
           lock_mode: str | None, untrusted_ok: bool = False) -> None:
    """Check hashes, chain, signature and retention; exit 1 if any recording fails or is unverified.

    The signing key is trusted from --public-key, the gateway's --config, --data-dir, or the
    ./guarita-data folder of `bastion serve --dev`. A session hidden by an S3 delete marker
    fails; a stretch the recorder could not record (a full spool under best_effort) is named."""
    if bool(session) == all_:
        raise click.UsageError("give a SESSION or --all")
    trusted = ctx.trusted_keys(public_keys)
    targets = _sessions(ctx, Filters(since=since)) if all_ else [_open(ctx, session or "")]
    failed = unverified = 0
    warned: set[str] = set()
    for summary in progress(targets, "verifying"):
        result = verify_session(ctx.store(), summary, trusted, lock_mode, untrusted_ok=untrusted_ok)
        for warning in result.warnings:
            if warning not in warned:
                warned.add(warning)
                click.echo(f"warning: {warning}", err=True)
        gaps = "".join(f"; GAP {g}" for g in result.gaps) if result.ok or result.unverified else ""
        if result.problems:
            failed += 1
            click.echo(f"{summary.id}: FAILED: {result.problems[0]}")
        elif result.unverified:
            unverified += 1
            click.echo(f"{summary.id}: UNVERIFIED: hashes and chain hold ({result.segments} segments), but no trusted "
                       f"public key vouches for the signature{gaps}")
        else:
            click.echo(f"{summary.id}: OK ({result.segments} segments){gaps}")
    if unverified:
        click.echo("replay: no trusted public key: pass --public-key (see `bastion keys`), --config or --data-dir; "
                   "or --no-trusted-key to accept the manifests' own keys", err=True)
    if all_:
        click.echo(f"{len(targets) - failed - unverified} verified, {failed} failed"
                   + (f", {unverified} unverified" if unverified else ""), err=True)
    sys.exit(1 if failed or unverified else 0)


def _print_commands(ctx: Context, summary: SessionSummary) -> None:
    from replay.asciicast import marker_label

    try:
        markers = [event for event in iter_events(ctx.store(), summary)
                   if event.code == "m" and isinstance(event.data, dict) and event.data.get("type") in (
                       "command", "approval", "approval-request", "approval-decision")]
    except ReplayError as exc:
        _fail(str(exc))
    command = summary.meta.get("command")
    # An exec command has its own marker (with its outcome) when the gateway indexed it: once.
    if command and not any(m.data.get("type") == "command" and m.data.get("mode") == "exec" for m in markers):
        click.echo(f"{format_offset(0):>9}  {command}")
    for event in markers:
        click.echo(f"{format_offset(event.t):>9}  {marker_label(event.data)}")


@main.command("index")
@click.option("--rebuild", is_flag=True, required=True, help="Index every sealed session in the bucket.")
@click.option("--state", "state_url", metavar="URL", required=True,
              help="The state database holding the index: sqlite:///PATH or postgresql://...")
@click.option("--since", help="Only sessions started in the last DURATION (2h, 3d) or since an ISO date.")
@pass_store
def index(ctx: Context, rebuild: bool, state_url: str, since: str | None) -> None:
    """(Re)build the archive index from the recordings alone (read access to the bucket is
    enough): sessions, their commands and the keyed hashes of masked values."""
    from replay import cli_index

    count = cli_index.rebuild(state_url, ctx.store(), _parse_since(since))
    click.echo(f"indexed {count} sessions from {ctx.store().url} into {state_url}")


if __name__ == "__main__":
    main()
