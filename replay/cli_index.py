"""The `replay` CLI's use of the archive index: `--state URL` on ls, search and masked, and
`replay index --rebuild`. The answers are the scan's (replay/index.py); only faster."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

from recorder.store import RecordingStore, StoreError

if TYPE_CHECKING:  # imported when used: `replay` without --state loads no database driver
    from bastion.state.archive import ArchiveIndex
    from replay.reader import SessionSummary
    from replay.search import Hit, MaskHit

T = TypeVar("T")


def state_option(fn: Any) -> Any:
    return click.option("--state", "state_url", metavar="URL",
                        help="Answer from the archive index in this state database (sqlite:///PATH or "
                             "postgresql://...) instead of reading every recording; sealed sessions only.")(fn)


def _run(url: str, work: Callable[[ArchiveIndex], Awaitable[T]]) -> T:
    from bastion.state.archive import open_archive_index
    from bastion.state.store import StateError

    async def main() -> T:
        index = open_archive_index(url)
        try:
            return await work(index)
        finally:
            await index.close()

    try:
        return asyncio.run(main())
    except StateError as exc:
        raise click.ClickException(str(exc)) from None
    except (OSError, ConnectionError) as exc:
        raise click.ClickException(f"state database {url}: {exc}") from None


def _narrow(filters: Any) -> dict[str, Any]:
    """The filters the database can apply; Filters.match re-checks all of them."""
    return {"since": filters.since.timestamp() if filters.since else None,
            "until": filters.until.timestamp() if filters.until else None,
            "subject": filters.subject}


def sessions(url: str, filters: Any) -> list[SessionSummary]:
    from replay import index as archive

    return _run(url, lambda index: archive.indexed_sessions(index, filters.match, **_narrow(filters)))


def command_hits(url: str, filters: Any, pattern: re.Pattern[str]) -> list[Hit]:
    from replay import index as archive

    return _run(url, lambda index: archive.command_hits(index, filters.match, pattern, **_narrow(filters)))


def mask_hits(url: str, filters: Any, hmac: str) -> list[MaskHit]:
    from replay import index as archive

    return _run(url, lambda index: archive.mask_hits(index, filters.match, hmac, **_narrow(filters)))


def rebuild(url: str, store: RecordingStore, since: Any) -> int:
    from replay import index as archive

    def progress(n: int) -> None:
        click.echo(f"\rindexed {n} sessions", nl=False, err=True)

    def skipped(session: str, why: str) -> None:
        click.echo(f"\nreplay: {session} not indexed: {why}", err=True)

    try:
        count = _run(url, lambda index: archive.rebuild(store, index, since, on_progress=progress, on_skip=skipped))
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo("", err=True)
    return count
