"""What a manifest carries for the archive index: the session's commands and masked values.

The archive index (bastion/state/archive.py) answers "which sessions ran this command" and
"where was this value masked" without reading recordings. Both come from markers the
session recorded (``command`` markers, ``masking`` markers' ``values``); the recorder keeps
a copy of them as they are recorded and writes it into the signed manifest under
``index``, so indexing a session (live, or rebuilding from the bucket) reads one object.

``index`` = ``{"format": "guarita-index/1", "complete": true,
"commands": [[t, command], ...], "masked": [[t, stream, detector, offset, length, hmac], ...]}``
in recording order. A session with more than MAX_ENTRIES of them writes ``complete: false``
and no lists: indexing then reads its segments, as it does for recordings made before the
index existed (their manifests have no ``index``).
"""

from __future__ import annotations

import json
from typing import Any

INDEX_FORMAT = "guarita-index/1"
MAX_ENTRIES = 20_000

CommandRow = tuple[float, str]
# t, stream, detector, offset, length, keyed hash
MaskedRow = tuple[float, str, str, int, int, str]


class SessionIndexNotes:
    """Collects one session's index entries on the event loop (cheap: masking values stay
    JSON text until the manifest is written, in the worker thread)."""

    def __init__(self) -> None:
        self.commands: list[CommandRow] = []
        self._masked_raw: list[tuple[float, str, bytes]] = []
        self._masked: list[Any] = []
        self.overflow = False

    def _room(self) -> bool:
        if len(self.commands) + len(self._masked_raw) + len(self._masked) >= MAX_ENTRIES:
            self.overflow = True
        return not self.overflow

    def marker(self, t: float, kind: str, fields: dict[str, Any], exec_command: Any = None) -> None:
        if kind == "command" and self._room():
            self._command(t, str(fields.get("command", "")), fields, exec_command)
        elif kind == "masking" and fields.get("values") and self._room():
            self._masked.append((round(t, 6), str(fields.get("stream", "o")), fields["values"]))

    def marker_json(self, t: float, kind: str, key: str, raw: bytes, fields: dict[str, Any],
                    exec_command: Any = None) -> None:
        if kind == "masking" and key == "values" and self._room():
            self._masked_raw.append((round(t, 6), str(fields.get("stream", "o")), raw))
        elif kind == "command" and self._room():
            command = json.loads(raw) if key == "command" else fields.get("command", "")
            self._command(t, str(command), fields, exec_command)

    def _command(self, t: float, text: str, fields: dict[str, Any], exec_command: Any) -> None:
        # An exec session's own command marker is not repeated here: like the scan
        # (replay/search.py), the index takes that command from the metadata, at 0.0.
        if fields.get("mode") == "exec" and exec_command is not None and text == str(exec_command):
            return
        self.commands.append((round(t, 6), text))

    def to_manifest(self) -> dict[str, Any]:
        if self.overflow:
            return {"format": INDEX_FORMAT, "complete": False}
        pending = [(t, stream, json.loads(raw)) for t, stream, raw in self._masked_raw] + self._masked
        pending.sort(key=lambda item: item[0])  # stable: recording order within one instant
        masked = [list(row) for t, stream, values in pending for row in masked_rows(t, stream, values)]
        if len(self.commands) + len(masked) > MAX_ENTRIES:
            return {"format": INDEX_FORMAT, "complete": False}
        return {"format": INDEX_FORMAT, "complete": True, "commands": [list(c) for c in self.commands],
                "masked": masked}


def masked_rows(t: float, stream: str, values: Any) -> list[MaskedRow]:
    """The rows of one masking marker's ``values`` ([[detector, offset, length, hmac], ...]),
    skipping malformed entries the way a reader of the recording does."""
    return [(t, stream, str(v[0]), int(v[1]), int(v[2]), str(v[3]))
            for v in values or () if isinstance(v, list) and len(v) == 4]


def manifest_index(manifest: dict[str, Any]) -> tuple[list[CommandRow], list[MaskedRow]] | None:
    """The commands and masked rows a manifest carries, or None when the segments must be
    read instead (a manifest from before the index, or one whose index overflowed)."""
    index = manifest.get("index")
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT or not index.get("complete"):
        return None
    try:
        commands = [(float(t), str(c)) for t, c in index.get("commands") or ()]
        masked = [(float(r[0]), str(r[1]), str(r[2]), int(r[3]), int(r[4]), str(r[5]))
                  for r in index.get("masked") or ()]
    except (TypeError, ValueError, IndexError):
        return None
    return commands, masked
