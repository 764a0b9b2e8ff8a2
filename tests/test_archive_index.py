"""The archive index gives the scan's answers: `replay ls`, `search --commands-only` and
`masked` with `--state` print exactly what they print reading every recording, for an index
filled live (as manifests are stored) and for one rebuilt from the bucket alone, on SQLite
and on PostgreSQL. Recordings made before the index (no ``index`` in the manifest) and
sessions whose index overflowed are read from their segments.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

import recorder.index as recorder_index
from bastion.archive_indexer import ArchiveIndexer
from bastion.state import open_state
from recorder import Recorder, RecordingKey
from recorder.store import FileStore, session_prefix
from replay.cli import main as replay_main
from replay.index import required_literal
from tests.support import postgres

H_CPF = "a" * 63 + "1"
H_MAIL = "b" * 63 + "2"
H_NONE = "c" * 64


def _identity(subject: str, **extra: Any) -> dict[str, Any]:
    return {"subject": subject, "email": f"{subject}@example.com", "groups": ["sre"], **extra}


# (meta, commands, masking markers as (stream, values), how the manifest's index is written)
SESSIONS: list[tuple[dict[str, Any], list[str], list[tuple[str, list[list[Any]]]], str]] = [
    ({"identity": _identity("alice"), "target": "db1", "login": "pg", "kind": "exec", "tty": False,
      "command": "psql -c 'select cpf from clientes'"}, [], [("o", [["cpf", 7, 14, H_CPF]])], "index"),
    ({"identity": _identity("alice"), "target": "web1", "login": "ops", "kind": "shell", "tty": True,
      "command": None}, ["ls -la", "grep -i CPF data.csv", "rm -rf /tmp/x", "LS -LA"],
     [("o", [["cpf", 0, 14, H_CPF], ["email", 20, 17, H_MAIL]]), ("e", [["email", 3, 17, H_MAIL]])], "index"),
    ({"identity": _identity("bob"), "target": "web1", "login": "ops", "kind": "shell", "tty": True,
      "command": None}, ["kubectl get pods", "grep cpf /var/log/app.log"], [("o", [["cpf", 40, 14, H_CPF]])],
     "index"),
    ({"identity": _identity("carol", act=[{"sub": "agent-7"}]), "target": "db1", "login": "pg", "kind": "shell",
      "tty": True, "command": None}, ["sudo su -", "ſelect 1"], [], "index"),
    ({"identity": _identity("dave"), "target": "web2", "login": "ops", "kind": "shell", "tty": True,
      "command": None}, ["ls old-recording", "cat /etc/passwd"], [("o", [["email", 1, 17, H_MAIL]])], "old"),
    ({"identity": _identity("erin"), "target": "web2", "login": "ops", "kind": "shell", "tty": True,
      "command": None}, [f"echo {i}" for i in range(8)], [("o", [["cpf", i, 14, H_CPF]]) for i in range(4)],
     "overflow"),
]

COMMAND_PATTERNS = [("ls",), ("^ls -la$", "-i"), ("grep.*cpf",), ("cpf|pods",), ("select",), ("S",), ("s", "-i"),
                    ("echo [0-3]",), ("nothing-matches-this",), ("(?i)KUBECTL get",)]


async def _record(store: FileStore, tmp: Path, state_url: str) -> list[str]:
    key = RecordingKey.load_or_create(tmp / "key.pem")
    state = open_state(state_url)
    await state.start()
    rec = Recorder(store, tmp / "spool", key, segment_seconds=60, segment_bytes=4096, flush_interval=0.05)
    indexer = ArchiveIndexer(state, store)
    rec.on_session_stored = indexer.session_stored
    await rec.start()
    await indexer.start()
    ids = []
    for meta, commands, maskings, how in SESSIONS:
        with pytest.MonkeyPatch.context() as mp:
            if how == "overflow":
                mp.setattr(recorder_index, "MAX_ENTRIES", 5)
            session = rec.open_session(meta, term=(80, 24) if meta["tty"] else None)
            if how == "old":  # a recording from before the index: its manifest has none
                mp.setattr(session._index, "to_manifest", lambda: None)
            for i, command in enumerate(commands):
                session.output(f"$ {command}\r\n{secrets.token_hex(200)}\r\n".encode())
                session.marker("command", command=command, mode="interactive", outcome="allowed", rule=None)
                if i < len(maskings):
                    stream, values = maskings[i]
                    session.marker_json("masking", "values", json.dumps(values).encode(), stream=stream)
            for stream, values in maskings[len(commands):]:
                session.output(b"[CPF] shown\r\n")
                session.marker_json("masking", "values", json.dumps(values).encode(), stream=stream)
            session.exit(0)
            await session.close()
        ids.append(session.id)
    assert await rec.wait_uploaded(30)
    await rec.close()
    await indexer.stop()
    await state.close()
    assert indexer.indexed == len(SESSIONS) and indexer.failed == 0
    return ids


@pytest.fixture(scope="module")
def archive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, list[str]]]:
    tmp = tmp_path_factory.mktemp("archive")
    store = FileStore(tmp / "rec")
    state_url = f"sqlite:///{tmp / 'state.db'}"
    ids = asyncio.run(_record(store, tmp, state_url))
    yield store.url, state_url, ids


@pytest.fixture(scope="module")
def pg() -> Iterator[postgres.PostgresCluster]:
    if not postgres.available():
        pytest.skip("PostgreSQL 15 binaries are not installed")
    with postgres.PostgresCluster() as cluster:
        yield cluster


def _replay(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(replay_main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.stdout


def _queries() -> list[list[str]]:
    queries = [["ls", "--json"], ["ls", "--json", "--subject", "alice", "--since", "5y"],
               ["ls", "--json", "--subject", "agent-7"], ["ls", "--json", "--subject", "bob", "--target", "web1"],
               ["ls", "--json", "--since", "1h", "--until", "1h"]]
    queries += [["search", "--json", "--commands-only", *p] for p in COMMAND_PATTERNS]
    queries += [["search", "--json", "--commands-only", "ls", "--subject", "alice@example.com"]]
    queries += [["masked", "--json", h] for h in (H_CPF, H_MAIL, H_NONE)]
    queries += [["masked", "--json", H_CPF, "--subject", "bob"]]
    return queries


def _same_as_scan(recordings: str, state_url: str) -> None:
    for query in _queries():
        scan = _replay("--recordings", recordings, *query)
        indexed = _replay("--recordings", recordings, *query, "--state", state_url)
        assert indexed == scan, (query, scan, indexed)


def test_live_index_answers_like_the_scan(archive: tuple[str, str, list[str]]) -> None:
    recordings, state_url, ids = archive
    _same_as_scan(recordings, state_url)
    # The answers are not empty: the comparison above can fail.
    code, out = _replay("--recordings", recordings, "masked", "--json", H_CPF, "--state", state_url)
    hits = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and {h["session"] for h in hits} == {ids[0], ids[1], ids[2], ids[5]}
    assert len([h for h in hits if h["session"] == ids[5]]) == 4  # the overflowed session, from its segments
    code, out = _replay("--recordings", recordings, "masked", "--json", H_MAIL, "--state", state_url)
    assert {json.loads(line)["session"] for line in out.splitlines()} == {ids[1], ids[4]}  # ids[4]: old format
    code, out = _replay("--recordings", recordings, "search", "--json", "--commands-only", "grep.*cpf",
                        "--state", state_url)
    assert [json.loads(line)["session"] for line in out.splitlines()] == [ids[2]]
    code, out = _replay("--recordings", recordings, "search", "--commands-only", "cpf", "--state", state_url)
    assert code == 0 and ids[0] in out and "psql" in out  # the exec command itself
    code, _ = _replay("--recordings", recordings, "masked", H_NONE, "--state", state_url)
    assert code == 1


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_rebuilt_index_answers_like_the_scan(archive: tuple[str, str, list[str]], database: str,
                                             tmp_path: Path, request: pytest.FixtureRequest) -> None:
    recordings, _, ids = archive
    if database == "sqlite":
        state_url = f"sqlite:///{tmp_path / 'rebuilt.db'}"
    else:
        state_url = request.getfixturevalue("pg").url
    # The command an auditor runs, as a program, with read access to the bucket only.
    done = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", recordings, "index", "--rebuild",
                           "--state", state_url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"indexed {len(ids)} sessions" in done.stdout
    _same_as_scan(recordings, state_url)
    # A second rebuild replaces rows instead of doubling them.
    assert subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", recordings, "index", "--rebuild",
                           "--state", state_url], capture_output=True, timeout=120).returncode == 0
    _same_as_scan(recordings, state_url)


def test_a_database_without_the_index_says_how_to_build_it(archive: tuple[str, str, list[str]],
                                                           tmp_path: Path) -> None:
    recordings, _, _ = archive
    result = CliRunner().invoke(replay_main, ["--recordings", recordings, "ls", "--state",
                                              f"sqlite:///{tmp_path / 'empty.db'}"])
    assert result.exit_code == 1
    assert "replay index --rebuild" in result.output and "Traceback" not in result.output


# -- the database prefilter never drops a match ------------------------------------------------

_PIECES = st.sampled_from(["a", "b", "k", "s", "S", "I", "é", "x", ".", "[ab]", "(a|b)", "*", "+", "?", "\\d",
                           "^", "$", "a{2}", "(?:ks)", " ", "-", "_", "%"])
_TEXT = st.text(alphabet=st.sampled_from(list("abkKsSIiıİſKé xy1-_%")), max_size=30)


@settings(max_examples=400, deadline=None)
@given(pieces=st.lists(_PIECES, min_size=1, max_size=8), text=_TEXT, ignore_case=st.booleans())
def test_required_literal_is_in_every_match(pieces: list[str], text: str, ignore_case: bool) -> None:
    try:
        pattern = re.compile("".join(pieces), re.IGNORECASE if ignore_case else 0)
    except re.error:
        return
    literal, folded = required_literal(pattern)
    if literal is None or not pattern.search(text):
        return
    # What the database is asked: LIKE (SQLite: ASCII case-insensitive) or lower() LIKE lower().
    if folded:
        assert literal.lower() in text.lower(), (pattern.pattern, text, literal)
    else:
        assert literal in text, (pattern.pattern, text, literal)


def test_rebuild_names_a_session_it_cannot_read_and_indexes_the_rest(archive: tuple[str, str, list[str]],
                                                                      tmp_path: Path) -> None:
    import shutil
    from urllib.parse import urlparse

    recordings, _, ids = archive
    copy = tmp_path / "rec"
    shutil.copytree(urlparse(recordings).path, copy)
    old = ids[4]  # a manifest without an index: indexing reads its segments
    (copy / session_prefix(old) / "seg-000000.zst").unlink()
    done = subprocess.run([sys.executable, "-m", "replay.cli", "--recordings", copy.as_uri(), "index", "--rebuild",
                           "--state", f"sqlite:///{tmp_path / 'state.db'}"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"replay: {old} not indexed: segment" in done.stderr and "missing" in done.stderr
    assert f"indexed {len(ids) - 1} sessions" in done.stdout and "Traceback" not in done.stderr
