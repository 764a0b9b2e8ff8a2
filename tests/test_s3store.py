"""S3Store against a real ``moto_server`` on loopback (Object Lock, write-once, errors).

The :class:`MotoServer` helper here is also used by ``test_recorder_faults.py``: it runs
``moto_server`` as a subprocess on a free loopback port so that a test can stop it and
start it again on the same port. moto keeps its state in memory only, so a restart can
restore it by replaying moto's own request log (``MOTO_ENABLE_RECORDING``): the bucket is
created again with Object Lock and every object written before the stop comes back.
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from recorder.s3store import S3Store
from recorder.store import NotFound, ObjectExists, StoreError, open_store

REPO = Path(__file__).resolve().parent.parent
LOOPBACK = "127.0.0.1"
_live: set[MotoServer] = set()


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


class MotoServer:
    """``moto_server`` in a subprocess on 127.0.0.1, stoppable and restartable on its port."""

    def __init__(self, workdir: Path, *, record: bool = True, env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.record = record
        self.requests_log = workdir / "moto-requests.jsonl"
        self.extra_env = env or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, timeout: float = 30.0) -> MotoServer:
        env = {**os.environ, **self.extra_env}
        if self.record:
            env.update(MOTO_ENABLE_RECORDING="true", MOTO_RECORDER_FILEPATH=str(self.requests_log))
        self.starts += 1
        log = open(self.workdir / f"moto-{self.starts}.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", LOOPBACK, "-p", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        log.close()
        _live.add(self)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                text = (self.workdir / f"moto-{self.starts}.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"moto_server exited with {self.proc.returncode}:\n{text}")
            try:
                with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=1) as r:
                    r.read()
                return self
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"moto_server did not answer on {self.url} within {timeout}s") from None
                time.sleep(0.05)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        _live.discard(self)
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        """Stop, start on the same port, and bring back the state by replaying the request log."""
        self.stop()
        self.start()
        if self.record and self.requests_log.exists():
            # A request cut by the stop leaves a partial last line: drop it before the replay.
            lines = self.requests_log.read_bytes().splitlines(keepends=True)
            if lines and not lines[-1].endswith(b"\n"):
                self.requests_log.write_bytes(b"".join(lines[:-1]))
            req = urllib.request.Request(f"{self.url}/moto-api/recorder/replay-recording", method="POST")
            with urllib.request.urlopen(req, timeout=60) as r:
                r.read()

    def client(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.url, region_name="us-east-1", aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(request_checksum_calculation="when_supported", s3={"addressing_style": "path"}))

    def make_bucket(self, lock: bool = True) -> str:
        name = f"rec-{uuid.uuid4().hex[:12]}"
        if lock:
            self.client().create_bucket(Bucket=name, ObjectLockEnabledForBucket=True)
        else:
            self.client().create_bucket(Bucket=name)
        return name


@atexit.register
def _stop_forgotten() -> None:
    for server in list(_live):
        server.stop()


def aws_env(endpoint: str, tmp: Path) -> dict[str, str]:
    """Fake credentials and the endpoint, isolated from any AWS config on the machine."""
    return {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL_S3": endpoint, "AWS_CONFIG_FILE": str(tmp / "no-aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "no-aws-credentials"), "AWS_EC2_METADATA_DISABLED": "true"}


def set_aws_env(monkeypatch: pytest.MonkeyPatch, endpoint: str, tmp: Path) -> None:
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL", "GUARITA_RECORDING_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in aws_env(endpoint, tmp).items():
        monkeypatch.setenv(name, value)


@pytest.fixture(scope="module")
def moto(tmp_path_factory: pytest.TempPathFactory):
    server = MotoServer(tmp_path_factory.mktemp("moto"), record=False).start()
    yield server
    server.stop()


@pytest.fixture
def s3env(moto: MotoServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> MotoServer:
    set_aws_env(monkeypatch, moto.url, tmp_path)
    return moto


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
         "--http-listen", f"{LOOPBACK}:{free_port()}"],
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
