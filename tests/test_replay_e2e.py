"""replay on sessions recorded through the real SSH path: cat equals what the client saw,
watch follows a live session, search finds what was typed and printed, export plays."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.conftest import GatewayProcess, find_session, wait_for
from tests.support.oidc import OIDCProvider
from tests.support.openssh import PtySsh, run_ssh


def replay(gw: GatewayProcess, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", gw.recordings_dir.as_uri(), *args],
                          capture_output=True, timeout=timeout)


def test_cat_equals_what_the_client_saw(gateway: GatewayProcess, oidc: OIDCProvider) -> None:
    mark = gateway.audit_mark()
    command = "for i in $(seq 1 2000); do echo \"line $i $(printf '%*s' $((i % 70)) | tr ' ' x)\"; done; echo oops >&2"
    r = run_ssh(["-p", str(gateway.ssh_port), "web-key@127.0.0.1", command], token=oidc.token("agent-sre"))
    assert r.returncode == 0, r.stderr
    sid, manifest, _ = gateway.session_recording(mark, command=command)
    out = replay(gateway, "cat", "--raw", sid)
    assert out.returncode == 0, out.stderr
    assert out.stdout == r.stdout and out.stderr == r.stderr
    listed = replay(gateway, "ls", "--subject", "agent-sre", "--command", "seq 1 2000", "--exit", "0")
    assert sid.encode() in listed.stdout
    hits = replay(gateway, "search", r"line 1234 x+$", "--target", "web-key")
    assert hits.returncode == 0 and sid.encode() in hits.stdout and b"line 1234" in hits.stdout
    # The auditor's way: the gateway's config finds the store and the trusted recording key.
    verified = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gateway.config_path), "verify", sid],
                              capture_output=True, text=True, timeout=60)
    assert verified.returncode == 0 and "OK" in verified.stdout, verified.stdout + verified.stderr
    assert "no trusted public key" not in verified.stderr


def test_search_skips_segments_whose_summaries_cannot_match(gateway: GatewayProcess, oidc: OIDCProvider) -> None:
    """The gateway writes a search summary per segment; `replay search` reads only the segments
    that may match and finds exactly what reading them all finds (recorder/summary.py)."""
    from recorder import summary as search_summary
    from recorder.store import FileStore
    from replay.reader import open_session
    from replay.search import SearchStats, search_session

    if search_summary._engine is None:
        pytest.skip("the compiled summary (recorder/_summary.c) is not built: pip install -e .")
    mark = gateway.audit_mark()
    # Five bursts a little over a segment (1 s here) apart; in each, an escape sequence cuts
    # the word "batch" in two, as colouring does.
    command = ("for i in 1 2 3 4 5; do printf 'bat\\033[1mch-%s-summary\\033[0m\\n' $i; "
               "seq 1 200 | sed \"s/^/filler-$i-/\"; sleep 1.3; done")
    r = run_ssh(["-p", str(gateway.ssh_port), "web-key@127.0.0.1", command], token=oidc.token("agent-sre"))
    assert r.returncode == 0, r.stderr
    assert b"bat\x1b[1mch-4-summary" in r.stdout
    sid, manifest, _ = gateway.session_recording(mark, command=command)
    assert len(manifest["segments"]) >= 4 and all("summary" in seg for seg in manifest["segments"])
    skipping = replay(gateway, "search", "batch-4-summary", "--target", "web-key")
    full = replay(gateway, "search", "--no-skip", "batch-4-summary", "--target", "web-key")
    assert skipping.returncode == 0, skipping.stderr
    assert skipping.stdout == full.stdout and sid.encode() in skipping.stdout
    assert skipping.stdout.count(b"batch-4-summary") == 1
    store = FileStore(gateway.recordings_dir)
    summary = open_session(store, sid)
    stats = SearchStats()
    hits = list(search_session(store, summary, re.compile(r"filler-3-1\d\d$"), stats=stats))
    assert [h.text for h in hits] == [f"filler-3-{n}" for n in range(100, 200)]
    assert hits == list(search_session(store, summary, re.compile(r"filler-3-1\d\d$"), skip=False))
    assert stats.skipped >= 2 and stats.read >= 1, stats


def test_watch_follows_a_live_session(gateway: GatewayProcess, oidc: OIDCProvider, tmp_path: Path) -> None:
    mark = gateway.audit_mark()
    with PtySsh(["-tt", "-p", str(gateway.ssh_port), "web-key@127.0.0.1"], token=oidc.token("agent-sre")) as pty:
        pty.expect(rb"[$#] ")
        sid = wait_for(lambda: _live_session(gateway, mark), 10, "session.start")
        watched = bytearray()
        watcher = subprocess.Popen([sys.executable, "-m", "replay.cli", "--recordings", gateway.recordings_dir.as_uri(),
                                    "watch", sid, "--interval", "0.2", "--timeout", "60"],
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        reader = threading.Thread(target=lambda: watched.extend(watcher.stdout.read()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        try:
            pty.send(b"echo live-$((40+2))\r")
            pty.expect(b"live-42")
            # Segments are sealed every second (segment_seconds = 1s): watch sees it while the session runs.
            wait_for(lambda: _store_has(gateway, sid, b"live-42"), 15, "live output in the store")
            pty.send(b"exit\r")
            assert pty.wait() == 0
            assert watcher.wait(timeout=30) == 0
            reader.join(timeout=10)
        finally:
            if watcher.poll() is None:
                watcher.kill()
    assert b"live-42" in watched
    assert b"ended" in watcher.stderr.read()  # type: ignore[union-attr]


def _live_session(gw: GatewayProcess, mark: int) -> str | None:
    try:
        return find_session(gw.audit_events(mark), kind="shell")
    except LookupError:
        return None


def _store_has(gw: GatewayProcess, sid: str, needle: bytes) -> bool:
    out = replay(gw, "cat", "--raw", sid)
    return needle in out.stdout


def test_exported_shell_session_plays_in_asciinema(gateway: GatewayProcess, oidc: OIDCProvider,
                                                   tmp_path: Path) -> None:
    assert shutil.which("asciinema"), "asciinema is installed by `make test`"
    mark = gateway.audit_mark()
    with PtySsh(["-tt", "-p", str(gateway.ssh_port), "web-key@127.0.0.1"], token=oidc.token("agent-sre")) as pty:
        pty.expect(rb"[$#] ")
        pty.send(b"echo exported-$((6*7))\r")
        pty.expect(b"exported-42")
        pty.send(b"exit\r")
        assert pty.wait() == 0
    sid, _, _ = gateway.session_recording(mark, kind="shell")
    cast = tmp_path / "session.cast"
    assert replay(gateway, "export", sid, "-o", str(cast)).returncode == 0
    played = subprocess.run(["script", "-qec", f"asciinema play -i 0.05 {cast}", "/dev/null"],
                            capture_output=True, timeout=60)
    assert played.returncode == 0 and b"exported-42" in played.stdout
