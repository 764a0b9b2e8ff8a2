"""S3 uploads in a child process (recorder/uploads.py), against a real moto_server: the same
contract as the in-thread uploader, errors come back through the pipe, and a child that dies
is replaced without losing an upload (the recorder retries what it held)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from recorder.objects import StoreError
from recorder.store import open_store
from recorder.uploads import ProcessUploader, StoreConflict, ThreadUploader, Uploaded, uploader_for
from tests.support.moto import MotoServer


@pytest.fixture
def uploader(s3env: MotoServer):  # type: ignore[no-untyped-def]
    url = f"s3://{s3env.make_bucket()}/rec"
    up = uploader_for(url, "GOVERNANCE", 3600.0, open_store(url, "GOVERNANCE", 3600.0))
    assert isinstance(up, ProcessUploader)
    yield up, open_store(url, "GOVERNANCE", 3600.0)
    up.close()


def _spool(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def test_the_child_puts_and_answers_like_the_thread(uploader, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up, store = uploader
    assert up.put_file(_spool(tmp_path, "seg-000000.zst", b"segment"), "s/seg-000000.zst") == Uploaded(7, None)
    assert up.put_file(_spool(tmp_path, "manifest.json", b"{}"), "s/manifest.json") == Uploaded(2, b"{}")
    assert store.get("s/seg-000000.zst") == b"segment"
    # The same bytes again: already uploaded by an earlier try, not an error.
    assert up.put_file(tmp_path / "seg-000000.zst", "s/seg-000000.zst").size == 7
    assert os.getpid() not in (up._child.proc.pid,)  # the PUTs ran in another process


def test_errors_come_back_through_the_pipe(uploader, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up, _ = uploader
    up.put_file(_spool(tmp_path, "a.zst", b"first"), "k/a.zst")
    with pytest.raises(StoreConflict, match="already exists .* with different content"):
        up.put_file(_spool(tmp_path, "b.zst", b"other"), "k/a.zst")
    with pytest.raises(FileNotFoundError):
        up.put_file(tmp_path / "never-written.zst", "k/c.zst")


def test_a_dead_child_is_replaced(uploader, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up, store = uploader
    up.put_file(_spool(tmp_path, "one.zst", b"1"), "d/one.zst")
    child = up._child
    os.kill(child.proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not child.dead:  # the reply reader sees the pipe close
        assert time.monotonic() < deadline, "the dead child was not noticed"
        time.sleep(0.02)
    assert up.put_file(_spool(tmp_path, "two.zst", b"2"), "d/two.zst").size == 1
    assert up._child is not child and store.get("d/two.zst") == b"2"


def test_a_closed_uploader_refuses(uploader, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    up, _ = uploader
    up.close()
    with pytest.raises(StoreError, match="closed"):
        up.put_file(_spool(tmp_path, "x.zst", b"x"), "x/x.zst")


def test_a_local_folder_keeps_the_threads(tmp_path: Path) -> None:
    store = open_store(tmp_path.as_uri())
    assert isinstance(uploader_for(tmp_path.as_uri(), "GOVERNANCE", 3600.0, store), ThreadUploader)
