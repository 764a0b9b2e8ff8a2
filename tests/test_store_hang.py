"""A store that hangs (SIGSTOP, not an error) shows in /readyz and the metrics, and a strict
gateway behaves the same whether the recordings store goes down while it runs or is down
when it starts: it serves from the spool (real moto_server, PostgreSQL, OpenSSH)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, Targets, wait_for
from tests.support import postgres
from tests.support.moto import MotoServer, set_aws_env
from tests.support.oidc import OIDCProvider
from tests.support.openssh import run_ssh
from tests.test_operations import _s3_config, dest, http_json, scrape, value


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP: the processes keep their sockets open and answer nothing (a hung server)."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


def _timed_scrape(gw: GatewayProcess) -> dict:
    started = time.monotonic()
    samples = scrape(gw)
    assert time.monotonic() - started < 15, "a scrape must answer while a store hangs"
    return samples


def test_hung_store_and_database_show_in_readiness_and_metrics(
        tmp_path: Path, oidc: OIDCProvider, targets: Targets, start_gateway: Callable[..., GatewayProcess],
        monkeypatch: pytest.MonkeyPatch) -> None:
    moto = MotoServer(tmp_path / "moto", record=False).start()
    pg = postgres.PostgresCluster().start()
    try:
        set_aws_env(monkeypatch, moto.url, tmp_path)
        bucket = moto.make_bucket(lock=True)
        text = _s3_config("{data_dir}", bucket, oidc, targets, state=pg.url)
        gw = start_gateway(text)
        wait_for(lambda: http_json(gw.http_url + "/readyz")[0] == 200, 20, "ready")
        assert value(_timed_scrape(gw), "guarita_store_up") == 1

        assert moto.proc is not None
        with stopped([moto.proc.pid]):
            wait_for(lambda: value(_timed_scrape(gw), "guarita_store_up") == 0, 30, "guarita_store_up 0")
            status, body = http_json(gw.http_url + "/readyz")
            assert status == 503 and not body["checks"]["recordings"], body
            assert "did not answer" in body["problems"]["recordings"] or "has not finished" in \
                body["problems"]["recordings"], body
            # Running, strict: sessions go on, recorded to the spool.
            r = run_ssh([*dest(gw, f"{targets.login}@web-key"), "echo spooled-$((40+2))"],
                        token=oidc.token("agent-sre"))
            assert r.returncode == 0 and r.stdout == b"spooled-42\n", r.stderr

            # Starting, strict, with the same store hung: the same behaviour (serves, not ready).
            other = start_gateway(text)
            assert http_json(other.http_url + "/readyz")[0] == 503
            assert "ALERT recordings store" in other.log_text() and "does not answer" in other.log_text()
            r = run_ssh([*dest(other, f"{targets.login}@web-key"), "echo also-spooled"],
                        token=oidc.token("agent-sre"))
            assert r.returncode == 0 and r.stdout == b"also-spooled\n", r.stderr
        wait_for(lambda: value(_timed_scrape(gw), "guarita_store_up") == 1, 60, "guarita_store_up back to 1")
        wait_for(lambda: value(scrape(gw), "guarita_uploads_pending") == 0, 60, "the spool uploaded")

        # The state database hangs: every PostgreSQL process stopped (the pool's connections too).
        assert pg.pid is not None
        with stopped([pg.pid, *_children(pg.pid)]):
            wait_for(lambda: value(_timed_scrape(gw), "guarita_state_up") == 0, 30, "guarita_state_up 0")
            started = time.monotonic()
            status, body = http_json(gw.http_url + "/readyz")
            assert time.monotonic() - started < 10
            assert status == 503 and not body["checks"]["state"], body
        wait_for(lambda: value(_timed_scrape(gw), "guarita_state_up") == 1, 60, "guarita_state_up back to 1")
        wait_for(lambda: http_json(gw.http_url + "/readyz")[0] == 200, 60, "ready again")
    finally:
        moto.stop()
        pg.stop()
