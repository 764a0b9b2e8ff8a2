"""``moto_server`` on loopback, stoppable and restartable on its port (S3 for the tests).

It runs as a subprocess on a free loopback port so that a test can stop it and start it
again on the same port. moto keeps its state in memory only, so a restart can restore it by
replaying moto's own request log (``MOTO_ENABLE_RECORDING``): the bucket is created again
with Object Lock and every object written before the stop comes back. An ``atexit`` hook
stops whatever a test forgot. (Moved here from tests/test_s3store.py, which re-exports it.)
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from tests.support.openssh import free_port

LOOPBACK = "127.0.0.1"
_live: set[MotoServer] = set()


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
