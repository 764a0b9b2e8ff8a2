"""What every recordings store speaks: its errors (and guarita's one ``NotFound``), what it says of an object, and the
interface (recorder/store.py: the local folder and ``open_store``; recorder/s3store.py:
S3 with Object Lock). Imports no other store module, so both can import it."""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol


class NotFound(LookupError):
    """What was asked for by name is not there; ``str()`` says which in one line.

    guarita's one not-found: catch this. Each layer raises its own subclass, which is also
    that layer's error (:class:`ObjectNotFound`, a :class:`StoreError`, here;
    ``bastion.state.StateNotFound``, a ``StateError``, for requests, locks and sessions), so
    ``except StoreError`` / ``except StateError`` still see it. It lives here, in the lowest
    layer, so that both can derive from it without an import cycle."""


class StoreError(Exception):
    """The store could not do what was asked; ``str()`` says why in one line."""


class ObjectExists(StoreError):
    pass


class ObjectNotFound(StoreError, NotFound):
    """No such object in the recordings store."""


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    lock_mode: str | None = None
    retain_until: datetime | None = None


class RecordingStore(Protocol):
    url: str
    # False for the local folder: said plainly at start-up and by `replay verify`.
    write_once: bool

    def put(self, key: str, data: bytes) -> None:
        """Create ``key``; raise ObjectExists if it is already there (never overwrite)."""

    def get(self, key: str) -> bytes: ...

    def head(self, key: str) -> ObjectInfo: ...

    def list(self, prefix: str) -> Iterator[str]:
        """Keys under ``prefix`` in lexical order."""

    def check(self) -> builtins.list[str]:
        """Problems that make this store unfit for recordings (empty when fine)."""
