"""``replay verify``: prove a recording is whole and unaltered since the gateway sealed it.

Checks, in order, stopping the chain walk at the first broken link:
the manifest's signature (against a trusted public key when one is given), that the
signing key is the trusted one, then for each segment: present, SHA-256 equal to the
manifest's, header naming this session and index, header's ``prev_sha256`` equal to
the previous segment's hash; finally, that the store holds no segment the manifest
does not list. On a write-once store, each object's lock mode and retain-until date.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import UTC, datetime

from recorder.segment import SegmentError, parse_segment, segment_name
from recorder.signing import verify_signature
from recorder.store import NotFound, RecordingStore, StoreError, session_prefix
from replay.reader import SessionSummary


@dataclass
class VerifyResult:
    session: str
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    segments: int = 0
    # Hashes and chain hold, but nothing trusted vouches for the signing key: without a
    # trusted public key anyone who can write the bucket can re-sign a forged manifest.
    unverified: bool = False
    # Stretches the recorder could not record (best_effort, spool full): "from-to: why".
    gaps: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and not self.unverified


def verify_session(store: RecordingStore, summary: SessionSummary, trusted_key: bytes | Collection[bytes] | None,
                   lock_mode: str | None = None, untrusted_ok: bool = False) -> VerifyResult:
    """``trusted_key``: the recording key, or a keyring (every key the gateways signed with
    across rotations). Without one the result is ``unverified`` (not ok), unless
    ``untrusted_ok``: then the signature is checked against the manifest's own key only."""
    result = VerifyResult(summary.id)
    prefix = session_prefix(summary.id)
    if summary.deleted:
        result.problems.append(f"{', '.join(summary.deleted)} hidden by an S3 delete marker (DeleteObject without a "
                               "version id): the session was made to look deleted; its locked versions are still "
                               "in the bucket (aws s3api list-object-versions)")
        return result
    if summary.problem:
        result.problems.append(summary.problem)
        return result
    try:
        raw_manifest = store.get(prefix + "manifest.json")
    except NotFound:
        result.problems.append("no manifest: the session is still running, or was never sealed")
        return result
    except StoreError as exc:
        result.problems.append(f"manifest.json cannot be read: {exc}")
        return result
    try:
        manifest = json.loads(raw_manifest)
        signature = manifest.pop("signature")
        public_raw = base64.b64decode(manifest["public_key"])
        records = manifest["segments"]
    except (ValueError, KeyError, TypeError) as exc:
        result.problems.append(f"manifest.json is not a readable manifest ({exc})")
        return result
    if not verify_signature(public_raw, manifest, signature):
        result.problems.append("manifest.json: signature does not match its content (manifest altered)")
        return result
    keyring = (trusted_key,) if isinstance(trusted_key, bytes) else tuple(trusted_key or ())
    if not keyring:
        if untrusted_ok:
            result.warnings.append("no trusted public key: the signature was checked only against the key inside "
                                   "the manifest, which anyone who can write the bucket can replace")
        else:
            result.unverified = True
    elif public_raw not in keyring:
        trusted = "the trusted recording key" if len(keyring) == 1 else f"any of the {len(keyring)} trusted keys"
        result.problems.append(f"manifest.json: signed by {manifest.get('key_id')}, not by {trusted}")
        return result
    if manifest.get("session", {}).get("id") != summary.id:
        result.problems.append("manifest.json: belongs to another session")
        return result
    result.gaps = [_gap_text(g) for g in (manifest.get("end") or {}).get("gaps") or [] if isinstance(g, dict)]
    _check_chain(store, prefix, records, summary.id, result)
    if result.ok:
        _check_extra_objects(store, prefix, len(records), result)
    if result.ok and store.write_once:
        _check_retention(store, prefix, len(records), lock_mode, result)
    elif not store.write_once:
        result.warnings.append("local folder store: objects are not write-once (integrity rests on the hashes "
                               "and signature alone)")
    return result


def _check_chain(store: RecordingStore, prefix: str, records: list[dict], sid: str, result: VerifyResult) -> None:
    prev: str | None = None
    for position, record in enumerate(records):
        index = int(record["index"])
        name = segment_name(index)
        if index != position:
            result.problems.append(f"manifest lists segment {index} at position {position}: a segment is missing")
            return
        try:
            data = store.get(prefix + name)
        except NotFound:
            result.problems.append(f"{name}: missing from the store")
            return
        except StoreError as exc:
            result.problems.append(f"{name}: cannot be read ({exc})")
            return
        digest = hashlib.sha256(data).hexdigest()
        if digest != record["sha256"]:
            result.problems.append(f"{name}: content differs from the manifest (sha256 {digest[:16]}…, "
                                   f"expected {record['sha256'][:16]}…): altered, truncated or replaced")
            return
        try:
            header, _ = parse_segment(data, name)
        except SegmentError as exc:
            result.problems.append(str(exc))
            return
        if header.get("session") != sid or header.get("index") != index:
            result.problems.append(f"{name}: header says session {header.get('session')} segment "
                                   f"{header.get('index')} (moved from elsewhere)")
            return
        if header.get("prev_sha256") != prev:
            result.problems.append(f"{name}: does not follow segment {index - 1} (hash chain broken)")
            return
        prev = digest
        result.segments += 1


def _check_extra_objects(store: RecordingStore, prefix: str, count: int, result: VerifyResult) -> None:
    expected = {prefix + segment_name(i) for i in range(count)}
    try:
        extra = [k for k in store.list(prefix) if k[len(prefix):].startswith("seg-") and k not in expected]
    except StoreError as exc:
        result.problems.append(f"cannot list {prefix}: {exc}")
        return
    if extra:
        result.problems.append(f"store holds segments the manifest does not list: {', '.join(extra)}")


def _check_retention(store: RecordingStore, prefix: str, count: int, lock_mode: str | None,
                     result: VerifyResult) -> None:
    now = datetime.now(UTC)
    for name in ["start.json", "manifest.json", *(segment_name(i) for i in range(count))]:
        try:
            info = store.head(prefix + name)
        except StoreError as exc:
            result.problems.append(f"{name}: cannot read its lock ({exc})")
            return
        if info.lock_mode is None or info.retain_until is None:
            result.problems.append(f"{name}: has no Object Lock retention")
            return
        if lock_mode and info.lock_mode != lock_mode:
            result.problems.append(f"{name}: lock mode {info.lock_mode}, expected {lock_mode}")
            return
        if info.retain_until <= now:
            result.problems.append(f"{name}: retention ended {info.retain_until.isoformat()}")
            return


def _gap_text(gap: dict) -> str:
    """A stretch the recorder lost (recorder.recorder: best_effort with a full spool)."""
    lost = f"{gap.get('lost_bytes', '?')} bytes of terminal data lost"
    return f"{float(gap.get('from', 0)):.1f}s-{float(gap.get('to', 0)):.1f}s not recorded ({lost}): {gap.get('reason')}"
