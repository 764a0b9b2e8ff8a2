"""``replay evidence``: one package for an auditor or a regulator.

For the sessions a filter selects (a data subject's operator, a target, a time range),
a ``.tar.gz`` holding, per session, the stored objects exactly as they are in the store
(``start.json``, the segments, the signed ``manifest.json``: anyone can check them again
with ``replay --recordings file://... verify``), a readable transcript, an asciicast
file for ``asciinema play``, the commands with their approvals, and the result of
``replay verify`` at export time. At the top: ``index.json`` and ``index.csv`` (who,
when, where, what, exit status, approvals, masking counts, verification), the trusted
recording public key when one was given, and a README saying how to check all of it.

The package is written to a temporary file next to the output and renamed into place,
so an interrupted export never leaves a partial file under the final name.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from recorder.signing import public_key_id
from recorder.store import RecordingStore, session_prefix
from replay.asciicast import marker_label, write_text, write_v2
from replay.reader import ReplayError, SessionSummary, iter_events
from replay.verify import verify_session

INDEX_FIELDS = ("id", "started_at", "state", "subject", "email", "groups", "actors", "source", "front_door", "target", "login",
                "namespace", "pod", "container", "kind", "command", "exit_status", "end_reason", "approvals", "masking", "verified",
                "problems", "masking_mode")

README = """guarita evidence package
========================

Made {made} by `replay evidence` for: {selection}
Sessions: {count}. Verified at export: {ok} OK, {failed} with problems (index.json "problems").

index.json / index.csv   one row per session: who (OIDC subject, e-mail, groups, the
                         delegation chain of agents acting for it ("actors", current
                         actor first, as RFC 8693 nests them), source address), where (target or cluster, login, namespace, pod), what
                         (kind, command), when, exit status, end reason, approvals
                         (request, approver, decision, reason), masking counts per
                         detector, and the result of `replay verify` at export time.
store/                   the sessions' objects exactly as stored, under their own keys:
                         start.json, the zstd segments (hash-chained) and manifest.json
                         (signed, Ed25519). It is a recordings folder `replay` can read.
sessions/ID/transcript.txt   what the session printed (and typed input), with its markers.
sessions/ID/session.cast     asciicast v2: `asciinema play sessions/ID/session.cast`.
sessions/ID/commands.txt     commands and approval events, with their time offsets.
recording-keys/          the trusted recording public keys, base64, one file each ({key_ids}).

To check it without trusting whoever made it (`pip install guarita` gives `replay`):

    mkdir evidence && tar xzf {package} -C evidence && cd evidence
    {verify}
    replay --recordings "file://$PWD/store" ls

{key_advice}

What is masked and what is not
------------------------------
{masking}
Masking applies per target or group as the gateway's policy says: "live" and "both" mask
what the agent saw and what was recorded, "recording" masks the recording only (the agent
saw the values), "none" (or no masking configured) masks nothing. Detectors find CPF,
CNPJ, payment cards (Luhn), e-mail addresses, Brazilian and international phone numbers
and the custom patterns configured; a value in a format they do not recognise (spelled
out, split across words, in an image, compressed or encoded) is NOT masked.
Never masked: what was typed (stdin is recorded as typed, except input typed while the
remote side did not echo, e.g. a password prompt, which is recorded only as its length),
file transfers (sftp, scp) and port forwards, and Kubernetes API objects. `kubectl logs`
is not recorded here (its masked values are in the gateway's audit log).
Masking markers hold keyed hashes, never values: `bastion mask-hash DETECTOR VALUE` with
the gateway's masking secret gives a value's hash, and `replay masked HASH` finds it.
"""


def write_package(store: RecordingStore, sessions: list[SessionSummary], out: Path, trusted_keys: tuple[bytes, ...],
                  selection: str) -> tuple[int, int]:
    """Write the package; returns (sessions verified OK, sessions with problems)."""
    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    rows: list[dict[str, Any]] = []
    try:
        with tarfile.open(tmp, "w:gz") as tar:
            for summary in sessions:
                rows.append(_add_session(tar, store, summary, trusted_keys))
            ok = sum(1 for r in rows if r["verified"])
            _add(tar, "index.json", json.dumps(rows, ensure_ascii=False, indent=1).encode())
            _add(tar, "index.csv", _csv(rows))
            for key in trusted_keys:
                _add(tar, f"recording-keys/{public_key_id(key).replace(':', '-')}.pub", base64.b64encode(key) + b"\n")
            key_ids = ", ".join(public_key_id(k) for k in trusted_keys) or "none: see below"
            _add(tar, "README.txt", README.format(made=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                                                  selection=selection, count=len(rows), ok=ok,
                                                  failed=len(rows) - ok, key_ids=key_ids, package=out.name,
                                                  **_key_instructions(trusted_keys),
                                                  masking=_masking_summary(rows)).encode())
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return ok, len(rows) - ok


def _key_instructions(trusted_keys: tuple[bytes, ...]) -> dict[str, str]:
    if trusted_keys:
        return {"verify": 'replay --recordings "file://$PWD/store" verify --all --public-key recording-keys',
                "key_advice": "Compare recording-keys/ with the keys the gateway's operators published "
                              "(`bastion keys`)."}
    return {"verify": 'replay --recordings "file://$PWD/store" verify --all --public-key KEY.pem',
            "key_advice": "No trusted recording key was given when this package was made, so it holds none: "
                          "get the public key from the gateway's operators (`bastion keys`) and pass it as "
                          "KEY.pem. Without one, verify says UNVERIFIED (a manifest re-signed by another key "
                          "cannot be told from the gateway's); --no-trusted-key checks the rest alone."}


def _masking_summary(rows: list[dict[str, Any]]) -> str:
    """Per session: where masking applied and how many values each detector masked."""
    lines = []
    for row in rows:
        counts = ", ".join(f"{k} {v}" for k, v in sorted((row.get("masking") or {}).items()) if v) or "no values"
        lines.append(f"  {row['id']}: masking {row.get('masking_mode') or 'none'}; masked: {counts}\n")
    return "".join(lines)


def _add_session(tar: tarfile.TarFile, store: RecordingStore, summary: SessionSummary,
                 trusted_keys: tuple[bytes, ...]) -> dict[str, Any]:
    base = f"sessions/{summary.id}/"
    for key in store.list(session_prefix(summary.id)):
        _add(tar, "store/" + key, store.get(key))
    result = verify_session(store, summary, trusted_keys)
    problems = list(result.problems)
    if result.unverified:
        problems.append("UNVERIFIED: no trusted recording public key was given, the signature proves nothing")
    problems += [f"GAP {g}" for g in result.gaps]
    # Each view reads the recording again, through a temporary file: memory stays flat
    # whatever the session's size.
    marks: list[Any] = []
    try:
        _add_written(tar, base + "transcript.txt", lambda out: write_text(summary, iter_events(store, summary), out))
        _add_written(tar, base + "session.cast", lambda out: write_v2(summary, iter_events(store, summary), out))
        marks = [e for e in iter_events(store, summary) if e.code == "m" and isinstance(e.data, dict)]
    except ReplayError as exc:
        problems.append(f"cannot be read: {exc}")
    _add(tar, base + "commands.txt", "".join(_commands(summary, marks)).encode())
    return _row(summary, marks, not problems, problems)


def _add_written(tar: tarfile.TarFile, name: str, write: Callable[[IO[str]], None]) -> None:
    with tempfile.TemporaryFile() as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        write(text)
        text.flush()
        size = raw.tell()
        raw.seek(0)
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = size, int(time.time()), 0o644
        tar.addfile(info, raw)
        text.detach()


def _commands(summary: SessionSummary, events: Iterable[Any]) -> Iterator[str]:
    marks = [e for e in events if str(e.data.get("type", "")).startswith(("command", "approval"))]
    if summary.meta.get("command") and not any(e.data.get("type") == "command" for e in marks):
        yield f"0.0\tcommand: {summary.meta['command']}\n"
    for e in marks:
        yield f"{e.t:.1f}\t{marker_label(e.data)}\n"


def _row(summary: SessionSummary, marks: list[Any], verified: bool, problems: list[str]) -> dict[str, Any]:
    meta, identity = summary.meta, summary.identity
    approvals = [{k: v for k, v in e.data.items() if k != "type"} for e in marks
                 if e.data.get("type") == "approval-decision"]
    return {
        "id": summary.id, "started_at": meta.get("started_at"), "state": summary.state,
        "subject": identity.get("subject"), "email": identity.get("email"), "groups": identity.get("groups") or [],
        "actors": identity.get("act") or [],
        "source": meta.get("source"), "front_door": meta.get("front_door"), "target": meta.get("target"),
        "login": meta.get("login"), "namespace": meta.get("namespace"), "pod": meta.get("pod"),
        "container": meta.get("container"),
        "kind": meta.get("kind"), "command": meta.get("command"), "exit_status": summary.exit_status,
        "end_reason": summary.end.get("reason"), "approvals": approvals, "masking": summary.end.get("masking") or {},
        "verified": verified, "problems": problems, "masking_mode": meta.get("masking") or "none",
    }


def _csv(rows: list[dict[str, Any]]) -> bytes:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=INDEX_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v
                         for k, v in row.items()})
    return buf.getvalue().encode()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = int(time.time())
    info.mode = 0o644
    tar.addfile(info, io.BytesIO(data))
