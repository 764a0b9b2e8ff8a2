"""One gateway per data dir and per spool: an advisory lock held for the life of the process.

A second ``bastion serve`` on the same data dir would "recover" the running gateway's live
sessions from the spool (sealing recordings that are still being written) and take its
replica row in the state database. So ``serve`` takes an exclusive ``flock`` on
``<dir>/.guarita.lock`` in the data dir and in the spool before it creates or opens anything
else, and writes its pid there. The kernel drops the lock when the process exits, however it
exits (SIGKILL included): no stale lock file ever blocks a restart.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

LOCK_NAME = ".guarita.lock"


class InstanceLocked(Exception):
    """Another process holds the lock: ``str()`` is one line naming the dir and its pid."""


class InstanceLock:
    """Exclusive locks on several directories; release() (or process exit) frees them."""

    def __init__(self) -> None:
        self._fds: list[int] = []

    def acquire(self, dirs: list[Path]) -> None:
        """Lock each dir (created if missing); on any failure release what was taken and raise."""
        seen: set[Path] = set()
        try:
            for d in dirs:
                d = d.resolve()
                if d in seen:
                    continue
                seen.add(d)
                self._fds.append(_lock_dir(d))
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()


def _lock_dir(d: Path) -> int:
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise InstanceLocked(f"cannot lock {d}: {exc.strerror or exc} ({d / LOCK_NAME})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _read_pid(fd)
        os.close(fd)
        who = f"pid {holder}" if holder else "another process"
        raise InstanceLocked(f"{d} is in use by another guarita gateway ({who} holds {d / LOCK_NAME}); "
                             "one gateway per data dir and spool: stop it, or give this one its own "
                             "--data-dir") from None
    except OSError as exc:
        os.close(fd)
        raise InstanceLocked(f"cannot lock {d / LOCK_NAME}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else None
    except OSError:
        return None
