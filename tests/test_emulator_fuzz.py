"""The terminal emulator (pyte, in recorder/snapshot.py and the approval gate's detector)
never takes a session down: the output of real full-screen programs, run under a real PTY
here, is fed in random pieces and with random mutations, and every call must return.
Snapshots made after an emulator exception say ``degraded``."""

from __future__ import annotations

import os
import pty
import random
import select
import shutil
import signal
import time

import pytest

from bastion.approvals.detector import CommandDetector
from recorder.snapshot import ScreenTracker

# (program argv, keys typed once it started) for those installed; each ends by itself.
PROGRAMS = [
    (["vim", "-u", "NONE", "-N"], b"ihello\x1b:set number\r:q!\r"),
    (["vi", "-u", "NONE"], b":q\r"),
    (["less", "/etc/services"], b" G/tcp\rq"),
    (["top", "-b", "-n", "1"], b""),
    (["top", "-d", "0.2"], b"q"),
    (["tmux", "-L", "guarita-fuzz", "-f", "/dev/null", "new-session", "printf 'x\\033[?4my\\n'; exit"], b""),
    (["nano", "--ignorercfile", "/tmp/guarita-fuzz-nano"], b"text\x18n"),
    (["mc", "--nosubshell"], b"\x1b0"),
    (["sh", "-c", "printf '\\033[?1049h\\033[?4m\\033[?5n\\033[?1;2c\\033[?u\\033[>4;1m\\033[?25A\\033[?1049l'"], b""),
]


def _capture(argv: list[str], keys: bytes, deadline: float = 8.0) -> bytes:
    """The output of ``argv`` under a real PTY, with ``keys`` typed after its first output."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: a 80x24 terminal
        os.environ.update(TERM="xterm-256color", COLUMNS="80", LINES="24", HOME="/tmp")
        os.execvp(argv[0], argv)
    out = bytearray()
    sent = False
    end = time.monotonic() + deadline
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 65536)
                except OSError:
                    break
                if not chunk:
                    break
                out += chunk
            elif out and not sent:
                os.write(fd, keys)
                sent = True
            if os.waitpid(pid, os.WNOHANG)[0]:
                break
    finally:
        with _quiet():
            os.kill(pid, signal.SIGKILL)
        with _quiet():
            os.waitpid(pid, 0)
        os.close(fd)
    return bytes(out)


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _outputs() -> list[tuple[str, bytes]]:
    found = [(argv[0], _capture(argv, keys)) for argv, keys in PROGRAMS if shutil.which(argv[0])]
    if len(found) < 4:
        pytest.skip(f"too few full-screen programs installed: {[name for name, _ in found]}")
    return found


def _mutate(data: bytes, rng: random.Random) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(b) + 1)
        b[i:i] = rng.choice([b"\x1b[", b"\x1b[?", b"\x1b]", b"\x1bP", b";", b"?4m", b"\x9b", bytes([rng.randrange(256)]),
                             b"\x1b[?%dm" % rng.randrange(100), b"\x1b[%d;%dr" % (rng.randrange(40), rng.randrange(40))])
    return bytes(b)


def test_real_full_screen_output_never_raises() -> None:
    rng = random.Random(16)
    outputs = _outputs()
    assert any(b"\x1b[?1049h" in data or b"\x1b[?47h" in data for _, data in outputs)
    for name, data in outputs:
        for round_ in range(6):
            fed = data if round_ == 0 else _mutate(data, rng)
            tracker = ScreenTracker(80, 24)
            det = CommandDetector(80, 24)
            pos = 0
            while pos < len(fed):
                step = rng.randint(1, 4096)
                piece = fed[pos:pos + step]
                pos += step
                tracker.feed(piece)
                tracker.apply(*tracker.take())
                det.output(piece)
                if rng.random() < 0.3:
                    det.keys(b"x")
                    det.command()
                if rng.random() < 0.05:
                    tracker.resize(rng.randint(20, 120), rng.randint(5, 50))
                    det.resize(rng.randint(20, 120), rng.randint(5, 50))
            shot = tracker.snapshot()
            assert shot["ansi"].startswith("\x1b[0m"), name


def test_an_emulator_exception_marks_the_snapshot_degraded(monkeypatch: pytest.MonkeyPatch) -> None:
    tracker = ScreenTracker(80, 24)
    tracker.apply(b"\x1b[?4mvi -u NONE\r\n", False)  # pyte's own TypeError: handled, not degraded
    assert "vi -u NONE" in tracker.snapshot()["ansi"]

    def broken(*_: object, **__: object) -> None:
        raise ValueError("an emulator bug")

    monkeypatch.setattr(tracker._screen, "draw", broken)
    tracker.apply(b"anything", False)
    shot = tracker.snapshot()
    assert shot["degraded"] is True
    tracker.apply(b"after", False)
    again = tracker.snapshot()
    assert "after" in again["ansi"] and "degraded" not in again
