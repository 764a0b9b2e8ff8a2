"""S3Store against a real ``moto_server`` on loopback (Object Lock, write-once, errors).

The :class:`MotoServer` helper lives in ``tests/support/moto.py`` (re-exported here, as
``test_recorder_faults.py`` imports it from this module).
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import socket
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from botocore.exceptions import ClientError

from recorder.s3store import S3Store
from recorder.store import NotFound, ObjectExists, StoreError, open_store
from tests.support.moto import LOOPBACK, MotoServer, aws_env, set_aws_env

__all__ = ["LOOPBACK", "REPO", "MotoServer", "aws_env", "free_port", "set_aws_env", "wait_for"]

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.02):
    """Poll ``predicate`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- the store on a bucket with Object Lock -----------------------------------------------------


def test_endpoint_comes_from_environment(s3env: MotoServer) -> None:
    store = open_store("s3://some-bucket/a/b", "COMPLIANCE", 86400)
    assert isinstance(store, S3Store)
    assert store.endpoint == s3env.url  # botocore read AWS_ENDPOINT_URL_S3 itself
    assert store.url == "s3://some-bucket/a/b/" and store.write_once


def test_put_get_head_list(s3env: MotoServer) -> None:
    bucket = s3env.make_bucket()
    store = S3Store.from_url(f"s3://{bucket}/rec/site1", retention=3600)
    assert store.check() == []
    keys = ["2026/11/25/x/start.json", "2026/11/25/x/seg-000000.zst", "2026/11/25/x/seg-000001.zst",
            "2026/11/26/y/start.json"]
    for i, key in enumerate(keys):
        store.put(key, f"object {i}".encode() * 100)
    assert list(store.list("")) == sorted(keys)
    assert list(store.list("2026/11/25/x/")) == sorted(keys[:3])
    assert list(store.list("2026/11/27/")) == []
    assert store.get(keys[1]) == b"object 1" * 100

    before = datetime.now(UTC)
    info = store.head(keys[1])
    assert info.size == len(b"object 1" * 100)
    assert info.lock_mode == "COMPLIANCE"
    assert info.retain_until is not None and info.retain_until.tzinfo is not None
    remaining = (info.retain_until - before).total_seconds()
    assert 3600 - 60 < remaining <= 3600 + 1

    # Stored under the prefix, with the checksum the store verified and a content type.
    raw = s3env.client().head_object(Bucket=bucket, Key="rec/site1/" + keys[1], ChecksumMode="ENABLED")
    assert raw["ContentType"] == "application/zstd"
    assert raw["ChecksumSHA256"] == base64.b64encode(hashlib.sha256(b"object 1" * 100).digest()).decode()

    with pytest.raises(NotFound):
        store.get("2026/11/25/x/seg-000009.zst")
    with pytest.raises(NotFound):
        store.head("2026/11/25/x/seg-000009.zst")


def test_put_twice_is_refused(s3env: MotoServer) -> None:
    store = S3Store.from_url(f"s3://{s3env.make_bucket()}/p", retention=3600)
    store.put("k.json", b"first")
    with pytest.raises(ObjectExists, match="k.json already exists"):
        store.put("k.json", b"second")
    assert store.get("k.json") == b"first"


def test_governance_mode(s3env: MotoServer) -> None:
    store = S3Store.from_url(f"s3://{s3env.make_bucket()}/p", lock_mode="GOVERNANCE", retention=86400)
    store.put("a.json", b"{}")
    info = store.head("a.json")
    assert info.lock_mode == "GOVERNANCE"
    assert abs((info.retain_until - datetime.now(UTC)).total_seconds() - 86400) < 60


@pytest.mark.parametrize("mode", ["COMPLIANCE", "GOVERNANCE"])
def test_deleting_a_locked_version_is_refused(s3env: MotoServer, mode: str) -> None:
    bucket = s3env.make_bucket()
    store = S3Store.from_url(f"s3://{bucket}/p", lock_mode=mode, retention=3600)
    store.put("seg-000000.zst", b"evidence")
    client = s3env.client()
    version = client.head_object(Bucket=bucket, Key="p/seg-000000.zst")["VersionId"]
    with pytest.raises(ClientError) as err:
        client.delete_object(Bucket=bucket, Key="p/seg-000000.zst", VersionId=version)
    assert err.value.response["Error"]["Code"] == "AccessDenied"
    if mode == "COMPLIANCE":
        # Not even with the governance bypass.
        with pytest.raises(ClientError) as err:
            client.delete_object(Bucket=bucket, Key="p/seg-000000.zst", VersionId=version,
                                 BypassGovernanceRetention=True)
        assert err.value.response["Error"]["Code"] == "AccessDenied"
    assert store.get("seg-000000.zst") == b"evidence"


# -- start-up check -----------------------------------------------------------------------------


def test_check_bucket_without_object_lock(s3env: MotoServer) -> None:
    bucket = s3env.make_bucket(lock=False)
    problems = S3Store.from_url(f"s3://{bucket}/p").check()
    assert len(problems) == 2, problems
    assert f"bucket {bucket} does not have Object Lock enabled" in problems[0]
    assert "--object-lock-enabled-for-bucket" in problems[0]
    assert "put-object-lock-configuration" in problems[0]
    assert "versioning off" in problems[1] and "Status=Enabled" in problems[1]


def test_check_missing_bucket(s3env: MotoServer) -> None:
    problems = S3Store.from_url("s3://no-such-bucket-here/p").check()
    assert problems == [f"bucket no-such-bucket-here does not exist at {s3env.url}: create it with Object Lock "
                        "enabled: aws s3api create-bucket --bucket no-such-bucket-here --object-lock-enabled-for-bucket"]


def test_bad_lock_mode_and_url() -> None:
    with pytest.raises(ValueError, match="not one of COMPLIANCE, GOVERNANCE"):
        S3Store.from_url("s3://b/p", lock_mode="FOREVER")
    with pytest.raises(ValueError, match="needs a bucket|expected s3://BUCKET"):
        S3Store.from_url("s3:///p")


def test_gateway_refuses_to_start_on_bucket_without_object_lock(s3env: MotoServer, tmp_path: Path) -> None:
    bucket = s3env.make_bucket(lock=False)
    proc = subprocess.run(
        [sys.executable, "-m", "bastion.cli", "serve", "--dev", "--data-dir", str(tmp_path / "data"),
         "--recordings", f"s3://{bucket}/rec", "--ssh-listen", f"{LOOPBACK}:{free_port()}",
         "--http-listen", f"{LOOPBACK}:{free_port()}", "--kube-listen", f"{LOOPBACK}:{free_port()}"],
        cwd=REPO, env=os.environ.copy(), capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    start = lines.index(f"guarita: cannot start: recordings store s3://{bucket}/rec/ is not usable:")
    assert lines[start + 1].startswith(f"  - bucket {bucket} does not have Object Lock enabled")
    assert "--object-lock-enabled-for-bucket" in lines[start + 1]
    assert lines[start + 2].startswith(f"  - bucket {bucket} has versioning off")


# -- errors: clear, one line, bounded in time ----------------------------------------------------


def test_unreachable_endpoint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    url = f"http://{LOOPBACK}:{free_port()}"  # nothing listens there
    set_aws_env(monkeypatch, url, tmp_path)
    store = S3Store.from_url("s3://bucket/p", retention=60)
    started = time.monotonic()
    with pytest.raises(StoreError) as err:
        store.put("a.json", b"{}")
    assert str(err.value) == f"cannot reach {url}: connection refused"
    assert store.check() == [f"cannot reach {url}: connection refused"]
    assert time.monotonic() - started < 15


def test_endpoint_that_never_answers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind((LOOPBACK, 0))
        silent.listen(16)
        url = f"http://{LOOPBACK}:{silent.getsockname()[1]}"
        set_aws_env(monkeypatch, url, tmp_path)
        store = S3Store.from_url("s3://bucket/p", retention=60, connect_timeout=0.5, read_timeout=0.5,
                                 max_attempts=2)
        started = time.monotonic()
        with pytest.raises(StoreError) as err:
            store.put("a.json", b"{}")
        assert str(err.value) == f"{url} did not answer within 0.5s (s3://bucket/p/a.json)"
        assert time.monotonic() - started < 15


class _SlowDown(http.server.BaseHTTPRequestHandler):
    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        body = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
                b"<Message>Please reduce your request rate.</Message></Error>")
        self.send_response(503)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_PUT = do_GET = do_HEAD = _answer

    def log_message(self, *args: object) -> None:
        pass


def test_endpoint_answering_503(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    server = http.server.ThreadingHTTPServer((LOOPBACK, 0), _SlowDown)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        set_aws_env(monkeypatch, f"http://{LOOPBACK}:{server.server_address[1]}", tmp_path)
        store = S3Store.from_url("s3://bucket/p", retention=60, max_attempts=2)
        with pytest.raises(StoreError) as err:
            store.put("seg-000000.zst", b"x")
        assert str(err.value) == "s3://bucket/p/seg-000000.zst: 503 SlowDown (Please reduce your request rate.)"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_wrong_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # With INITIAL_NO_AUTH_ACTION_COUNT=0 moto checks every request's access key.
    server = MotoServer(tmp_path / "moto-auth", record=False, env={"INITIAL_NO_AUTH_ACTION_COUNT": "0"}).start()
    try:
        set_aws_env(monkeypatch, server.url, tmp_path)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG1")
        store = S3Store.from_url("s3://bucket/p", retention=60)
        started = time.monotonic()
        with pytest.raises(StoreError) as err:
            store.put("a.json", b"{}")
        assert str(err.value) == ("s3://bucket/p/a.json: access denied (InvalidAccessKeyId): check credentials "
                                  "(AWS_ACCESS_KEY_ID/AWS_PROFILE or the instance role) and the bucket policy")
        [problem] = store.check()
        assert "access denied" in problem and "check credentials" in problem
        assert time.monotonic() - started < 15
    finally:
        server.stop()
