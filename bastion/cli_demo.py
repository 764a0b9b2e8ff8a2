"""``bastion demo``: the tour that ``bastion serve --dev`` prints, run for you against it,
each line exactly as printed (bastion/devtour.py), with what a user would see."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import click

from bastion import devtour

SHOWN_LINES = 6  # of each step's output: enough to see what it did


def register(main: click.Group) -> None:
    main.add_command(demo)


@click.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("guarita-data"), show_default=True,
              help="The data folder of the running `bastion serve --dev`.")
@click.option("--quiet", "-q", is_flag=True, help="Only one line per step.")
def demo(data_dir: Path, quiet: bool) -> None:
    """Run the tour of a running `bastion serve --dev`: exec, shell, kubectl, a held command and
    its approval, masking, replay, verify, evidence, lock. Exit 0 when every step worked."""
    try:
        where = devtour.Where.load(data_dir)
    except FileNotFoundError:
        raise click.ClickException(f"no tour in {data_dir}: start `bastion serve --dev"
                                   f"{'' if data_dir == Path('guarita-data') else f' --data-dir {data_dir}'}` "
                                   "first (in another terminal), or give its --data-dir") from None
    except (OSError, ValueError, TypeError) as exc:
        raise click.ClickException(f"cannot read the tour in {data_dir}: {exc}") from None
    _check_running(where)
    steps = devtour.steps(where)
    runner = devtour.Runner(os.environ)
    worked = 0
    try:
        for n, step in enumerate(steps, 1):
            click.echo(f"[{n}/{len(steps)}] {step.what}")
            click.echo(f"  $ {step.line}")
            started = time.monotonic()
            result = runner.run(step)
            took = f" ({time.monotonic() - started:.1f} s)"
            if result.line != step.line:
                click.echo(f"  (ran: {result.line})")
            if not quiet:
                for line in _tail(result.output):
                    click.echo(f"    {line}")
            if result.ok:
                worked += 1
                click.echo(f"  ok{took}")
            else:
                click.echo(f"  FAILED{took}: {result.why}")
    finally:
        runner.close()
    click.echo(f"{worked} of {len(steps)} steps worked")
    sys.exit(0 if worked == len(steps) else 1)


def _check_running(where: devtour.Where) -> None:
    import urllib.request

    try:
        with urllib.request.urlopen(f"{where.http_url}/healthz", timeout=10):
            pass
    except OSError as exc:  # URLError and HTTPError are OSErrors
        raise click.ClickException(f"no gateway answers at {where.http_url} ({getattr(exc, 'reason', exc)}): is "
                                   f"`bastion serve --dev` still running for {where.data_dir}?") from None


def _tail(output: str) -> list[str]:
    lines = [line.rstrip() for line in output.replace("\r", "").splitlines() if line.strip()]
    if len(lines) > SHOWN_LINES:
        return [*lines[:SHOWN_LINES - 1], f"... ({len(lines) - SHOWN_LINES + 1} more lines)"]
    return lines
