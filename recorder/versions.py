"""Objects an S3 delete marker hides: what ``replay`` must not let vanish.

Object Lock stops the deletion of a locked *version*, but a DeleteObject without a version
id always succeeds, even under COMPLIANCE: it adds a delete marker, and from then on the
object is missing from ListObjects and GetObject answers 404. The locked version is still in
the bucket. A session whose ``start.json`` and ``manifest.json`` were "deleted" that way
would disappear from a listing; with these, ``replay ls`` still shows it and ``replay
verify`` names it as a failure. Stores without versions (the local folder) hide nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from recorder.store import ObjectNotFound, RecordingStore, StoreError

log = logging.getLogger("guarita.replay")
_warned: set[str] = set()


def hidden_objects(store: RecordingStore, prefix: str) -> dict[str, str]:
    """Keys under ``prefix`` (relative to the store) whose latest version is a delete marker
    while an older version holds data: key -> the newest such version id."""
    client: Any = getattr(store, "client", None)
    bucket = getattr(store, "bucket", None)
    if client is None or bucket is None:
        return {}
    base: str = getattr(store, "prefix", "")
    marked: set[str] = set()
    versions: dict[str, tuple[Any, str]] = {}
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:  # pragma: no cover - S3Store needs botocore
        return {}
    try:
        for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=base + prefix):
            for marker in page.get("DeleteMarkers", ()):
                if marker.get("IsLatest"):
                    marked.add(marker["Key"])
            for version in page.get("Versions", ()):
                key, when = version["Key"], version.get("LastModified")
                if key not in versions or (when is not None and when > versions[key][0]):
                    versions[key] = (when, version["VersionId"])
    except ClientError as exc:
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 403 or \
                exc.response.get("Error", {}).get("Code") == "AccessDenied":
            if store.url not in _warned:  # readable without it, but blind to delete markers: said once
                _warned.add(store.url)
                log.warning("cannot list object versions in %s (access denied): sessions hidden by an S3 delete "
                            "marker cannot be seen; grant s3:ListBucketVersions to check for them", store.url)
            return {}
        raise StoreError(f"{store.url}{prefix}: cannot list object versions ({exc})") from None
    except BotoCoreError as exc:
        raise StoreError(f"{store.url}{prefix}: cannot list object versions ({exc})") from None
    return {key[len(base):]: versions[key][1] for key in sorted(marked) if key in versions}


def get_version(store: RecordingStore, key: str, version_id: str) -> bytes:
    """One version of an object (a version hidden by a delete marker)."""
    client: Any = getattr(store, "client", None)
    if client is None:
        raise ObjectNotFound(f"{key}: {store.url} keeps no versions")
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        response = client.get_object(Bucket=getattr(store, "bucket", ""), Key=getattr(store, "prefix", "") + key,
                                     VersionId=version_id)
        return bytes(response["Body"].read())
    except (ClientError, BotoCoreError) as exc:
        raise StoreError(f"{store.url}{key} (version {version_id}): {exc}") from None
