"""Recordings on S3 or any S3-compatible store (AWS S3, MinIO, Ceph RGW) under Object Lock.

Every object is one PutObject (never multipart: Object Lock and checksums then apply to
the whole object in one request) with ``If-None-Match: *`` (write once: a second write of
the same key is refused by the store, 412), an Object Lock mode (COMPLIANCE by default,
GOVERNANCE configurable) and a retain-until date ``retention`` seconds from now, and a
SHA-256 checksum header that the store checks against the body.

Credentials come from boto3's standard chain (environment, profile, SSO, instance or pod
role). The endpoint is AWS unless ``AWS_ENDPOINT_URL_S3`` (or ``AWS_ENDPOINT_URL``) names
another one; botocore reads those variables itself. A custom endpoint is addressed in
path style (``http://host:port/bucket/key``), which MinIO, Ceph RGW and moto all accept.

Errors become :class:`StoreError` with a one-line reason (``str()``), never a traceback:
the recorder retries them, the gateway's start-up check and ``replay`` print them.
"""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from recorder.objects import ObjectExists, ObjectInfo, ObjectNotFound, StoreError

LOCK_MODES = ("COMPLIANCE", "GOVERNANCE")
_NOT_FOUND = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
           "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem"}
_CONTENT_TYPES = {".json": "application/json", ".zst": "application/zstd"}


class S3Store:
    """A RecordingStore on an S3 bucket with Object Lock: every object is write-once."""

    write_once = True

    def __init__(self, bucket: str, prefix: str = "", *, lock_mode: str = "COMPLIANCE",
                 retention: float = 5 * 31536000.0, endpoint_url: str | None = None,
                 connect_timeout: float = 5.0, read_timeout: float = 30.0, max_attempts: int = 3,
                 client: Any = None) -> None:
        if not bucket:
            raise ValueError("an S3 recordings URL needs a bucket: s3://BUCKET/PREFIX")
        lock_mode = lock_mode.upper()
        if lock_mode not in LOCK_MODES:
            raise ValueError(f"Object Lock mode {lock_mode!r} is not one of {', '.join(LOCK_MODES)}")
        if retention <= 0:
            raise ValueError(f"recording retention must be more than 0 seconds (got {retention})")
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.url = f"s3://{bucket}/{self.prefix}"
        self.lock_mode = lock_mode
        self.retention = float(retention)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        if client is None:
            custom = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            config = Config(
                connect_timeout=connect_timeout,
                read_timeout=read_timeout,
                retries={"mode": "standard", "total_max_attempts": max_attempts},
                request_checksum_calculation="when_supported",
                response_checksum_validation="when_supported",
                s3={"addressing_style": "path" if custom else "auto"},
            )
            # A session of our own: boto3's default session is not safe to share between threads.
            client = boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)
        self.client = client
        self.endpoint = str(client.meta.endpoint_url)

    @classmethod
    def from_url(cls, url: str, lock_mode: str = "COMPLIANCE", retention: float = 5 * 31536000.0,
                 **kwargs: Any) -> S3Store:
        """``s3://bucket/prefix`` -> a store; ``kwargs`` go to the constructor (timeouts, endpoint)."""
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an S3 recordings URL: {url!r} (expected s3://BUCKET/PREFIX)")
        return cls(parsed.netloc, parsed.path, lock_mode=lock_mode, retention=retention, **kwargs)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint={self.endpoint!r}, lock_mode={self.lock_mode!r})"

    # -- the RecordingStore protocol -------------------------------------------------------

    def put(self, key: str, data: bytes) -> None:
        retain_until = datetime.now(UTC) + timedelta(seconds=self.retention)
        ext = os.path.splitext(key)[1]
        try:
            self.client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*",
                ObjectLockMode=self.lock_mode, ObjectLockRetainUntilDate=retain_until,
                ChecksumAlgorithm="SHA256", ContentType=_CONTENT_TYPES.get(ext, "application/octet-stream"),
            )
        except ClientError as exc:
            if _code(exc) == "PreconditionFailed" or _status(exc) == 412:
                raise ObjectExists(f"{self.url}{key} already exists") from None
            raise self._error(exc, key) from None
        except BotoCoreError as exc:
            raise self._error(exc, key) from None

    def get(self, key: str) -> bytes:
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key), ChecksumMode="ENABLED")
            data: bytes = response["Body"].read()
            return data
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise ObjectNotFound(f"{key} not found in {self.url}") from None
            raise self._error(exc, key) from None
        except BotoCoreError as exc:
            raise self._error(exc, key) from None

    def head(self, key: str) -> ObjectInfo:
        # head_object rather than get_object_retention: one call, and some S3-compatible
        # stores (moto among them) do not implement GetObjectRetention.
        try:
            response = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as exc:
            if _code(exc) in _NOT_FOUND:
                raise ObjectNotFound(f"{key} not found in {self.url}") from None
            raise self._error(exc, key) from None
        except BotoCoreError as exc:
            raise self._error(exc, key) from None
        retain_until = response.get("ObjectLockRetainUntilDate")
        if isinstance(retain_until, datetime):
            retain_until = retain_until.astimezone(UTC)
        return ObjectInfo(key, int(response.get("ContentLength", 0)), response.get("ObjectLockMode"),
                          retain_until)

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` (relative to the store's prefix) in lexical order, as S3 lists them."""
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                for obj in page.get("Contents", ()):
                    yield obj["Key"][len(self.prefix):]
        except ClientError as exc:
            raise self._error(exc, prefix) from None
        except BotoCoreError as exc:
            raise self._error(exc, prefix) from None

    def check(self) -> builtins.list[str]:  # (``list`` here is the method above)
        """What makes this bucket unfit for recordings, each with what to change (empty when fine)."""
        b = self.bucket
        try:
            self.client.head_bucket(Bucket=b)
        except ClientError as exc:
            if _code(exc) in ("404", "NoSuchBucket", "NotFound"):
                return [f"bucket {b} does not exist at {self.endpoint}: create it with Object Lock enabled: "
                        f"aws s3api create-bucket --bucket {b} --object-lock-enabled-for-bucket"]
            return [str(self._error(exc))]
        except BotoCoreError as exc:
            return [str(self._error(exc))]
        problems = []
        try:
            conf = self.client.get_object_lock_configuration(Bucket=b).get("ObjectLockConfiguration") or {}
            lock_enabled = conf.get("ObjectLockEnabled") == "Enabled"
        except ClientError as exc:
            if _code(exc) != "ObjectLockConfigurationNotFoundError":
                return [f"cannot read the Object Lock configuration of bucket {b}: {self._error(exc)} "
                        "(the gateway needs s3:GetBucketObjectLockConfiguration)"]
            lock_enabled = False
        except BotoCoreError as exc:
            return [str(self._error(exc))]
        if not lock_enabled:
            problems.append(
                f"bucket {b} does not have Object Lock enabled (recordings there could be deleted or "
                f"overwritten): use a bucket created with it (aws s3api create-bucket --bucket NAME "
                f"--object-lock-enabled-for-bucket); AWS S3 can also turn it on for this bucket once versioning "
                f"is on (aws s3api put-object-lock-configuration --bucket {b} --object-lock-configuration "
                f"ObjectLockEnabled=Enabled), but MinIO and most S3-compatible stores allow it only when the "
                f"bucket is created; it cannot be turned off again")
        try:
            status = self.client.get_bucket_versioning(Bucket=b).get("Status")
        except ClientError as exc:
            return [*problems, f"cannot read the versioning state of bucket {b}: {self._error(exc)} "
                               "(the gateway needs s3:GetBucketVersioning)"]
        except BotoCoreError as exc:
            return [*problems, str(self._error(exc))]
        if status != "Enabled":
            problems.append(f"bucket {b} has versioning {'suspended' if status else 'off'}; Object Lock needs it "
                            f"on: aws s3api put-bucket-versioning --bucket {b} "
                            "--versioning-configuration Status=Enabled")
        return problems

    # -- helpers -----------------------------------------------------------------------------

    def _key(self, key: str) -> str:
        if not key or key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"invalid key {key!r}")
        return self.prefix + key

    def _error(self, exc: Exception, key: str = "") -> StoreError:
        """One line saying what went wrong and, when it helps, what to check."""
        where = f"{self.url}{key}"
        if isinstance(exc, ClientError):
            code, status = _code(exc), _status(exc)
            if code in _DENIED or status == 403:
                detail = "" if code in ("403", "AccessDenied") else f" ({code})"
                return StoreError(f"{where}: access denied{detail}: check credentials (AWS_ACCESS_KEY_ID/"
                                  f"AWS_PROFILE or the instance role) and the bucket policy")
            if code == "NoSuchBucket":
                return StoreError(f"{where}: bucket {self.bucket} does not exist at {self.endpoint}")
            message = _message(exc)
            if not code or code == str(status):
                return StoreError(f"{where}: HTTP {status}" + (f" {message}" if message and message != code else ""))
            return StoreError(f"{where}: {status} {code}" + (f" ({message})" if message and message != code else ""))
        if isinstance(exc, EndpointConnectionError):
            return StoreError(f"cannot reach {self.endpoint}: {_reason(exc)}")
        if isinstance(exc, ConnectTimeoutError):
            return StoreError(f"cannot reach {self.endpoint}: no connection within {self.connect_timeout:g}s")
        if isinstance(exc, ReadTimeoutError):
            return StoreError(f"{self.endpoint} did not answer within {self.read_timeout:g}s ({where})")
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return StoreError(f"{where}: no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and "
                              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or run with an instance/pod role")
        return StoreError(f"{where}: {exc}")


def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _message(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", "")).strip()


def _reason(exc: EndpointConnectionError) -> str:
    """``connection refused`` / ``name or service not known`` rather than urllib3's repr."""
    cause: BaseException | None = exc.kwargs.get("error") if hasattr(exc, "kwargs") else None
    seen = 0
    while cause is not None and seen < 6:
        if isinstance(cause, ConnectionRefusedError):
            return "connection refused"
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror.lower()
        cause = cause.__cause__ or cause.__context__ or (cause.args[0] if cause.args and
                                                         isinstance(cause.args[0], BaseException) else None)
        seen += 1
    text = str(exc.kwargs.get("error", exc)) if hasattr(exc, "kwargs") else str(exc)
    if "refused" in text.lower():
        return "connection refused"
    return text
