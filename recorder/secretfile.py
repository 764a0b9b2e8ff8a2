"""One way to write a secret to disk (private keys, the masking key, tokens): readable by its
owner only (0600 from the first byte), complete or absent (written under a temporary name
in the same folder, fsynced, then put in place), and, for keys created on first use, never
replacing a key another process wrote first.

Used by the gateway (bastion/) as well as the recorder, so it lives in the lowest package.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


def write_secret(path: Path, data: bytes, *, replace: bool = False) -> bool:
    """Write ``data`` to ``path`` (mode 0600). ``replace=False``: create it, or leave the file
    another process created first and return False; ``replace=True``: put it in place whatever
    was there (a refreshed token). True when this call's data is the file's."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and never over a file someone else wrote
            except FileExistsError:
                return False
        _sync_dir(path.parent)
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _sync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be fsynced
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
