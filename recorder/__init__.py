"""guarita's recording format, spool, storage backends and integrity.

A recording is a directory of objects in a store (``file://`` or ``s3://``):

    YYYY/MM/DD/<session-id>/start.json      session metadata, written when it starts
    YYYY/MM/DD/<session-id>/seg-000000.zst  events, cut every few seconds / few hundred KiB
    YYYY/MM/DD/<session-id>/manifest.json   metadata + every segment's hash, signed (Ed25519)

See docs/recording-format.md for the byte-level description.
"""

from recorder.events import Event
from recorder.recorder import Recorder, SessionRecording
from recorder.signing import RecordingKey
from recorder.store import RecordingStore, open_store

__all__ = ["Event", "Recorder", "RecordingKey", "RecordingStore", "SessionRecording", "open_store"]
