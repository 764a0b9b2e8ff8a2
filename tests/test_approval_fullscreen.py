"""Full-screen programs keep working in a gated session (issue 16): vim, less, top, nano,
mc and tmux each run through the gateway under a real PTY with an approval rule in force
(tests/test_approvals_e2e.py's gateway: commands saying ``needs-approval`` are held), and
the false holds (a request while using the program) are counted: there must be none.
(mc quits on F10 only once its first screen is drawn: the test waits for the key bar.) Inside
tmux the shell is still gated: the typed line is judged on the alternate screen too."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import GatewayProcess, Targets
from tests.support.oidc import OIDCProvider
from tests.test_approval_gate_classes import _held
from tests.test_approvals_e2e import PROMPT, REQUEST, agw, hooks, shell  # noqa: F401

__all__ = ["agw", "hooks"]

# program -> (command line, keys and what to expect before sending each; the program has
# exited once the shell prompt is back)
SESSIONS: dict[str, tuple[bytes, list[tuple[bytes, bytes]]]] = {
    "vim": (b"vim -u NONE -N -n /tmp/guarita-fs-$$.txt\r",
            [(rb"\x1b\[\?1049h", b"ihello world\rsecond line\x1b"), (rb"second line", b"ggdd:set number\r"),
             (rb"", b"\x0f\x1b[15~:q!\r")]),
    "less": (b"less /etc/services\r", [(rb"\x1b\[\?1049h|\x1b\[\?47h|tcp", b" G/udp\r"), (rb"udp", b"q")]),
    # top acts on the first byte of each read() only: an Enter and a "q" that reach it in one
    # read (coalesced on a loaded machine) drop the "q". With a long delay top draws a frame
    # only at start and in answer to a key, so the second frame proves the Enter was read.
    "top": (b"top -d 30\r", [(rb"load average", b"\r"), (rb"load average", b"q")]),
    # Each pattern must be new output: one already on the screen (nano's "Write Out" key label)
    # sends the next keys while the Enter before them is still being judged, and a Ctrl-C
    # then cancels that line and drops what follows it, as the gate promises.
    # mc reads keys once its whole screen is drawn: the key bar's last label ("Quit") is the sign.
    "mc": (b"mc -u -X\r", [(rb"Quit", b"\x1b[21~")]),
    "nano": (b"nano --ignorercfile /tmp/guarita-fs-$$.txt\r",
             [(rb"GNU nano|\x1b\[\?1049h", b"some text\rmore\x0f"), (rb"File Name to Write", b"\x03"),
              (rb"", b"\x18n")]),
}


def _count(text: bytes) -> int:
    return len(REQUEST.findall(text))


@pytest.mark.parametrize("program", sorted(SESSIONS))
def test_full_screen_program_without_false_holds(agw: GatewayProcess, oidc: OIDCProvider, targets: Targets,
                                                 program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} is not installed (.ci/install-deps installs it)")
    start, steps = SESSIONS[program]
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        before = len(pty.output())
        pty.send(b"TERM=xterm " + start)
        for pattern, keys in steps:
            if pattern:
                pty.expect(re.compile(pattern), timeout=20)
            pty.send(keys)
        pty.expect(PROMPT, timeout=20)
        pty.send(b"echo back-$((5*5))\r")
        pty.expect(rb"back-25", timeout=20)
        assert _count(pty.output()[before:]) == 0, f"false holds in {program}"
    finally:
        pty.close()


def test_tmux_inside_a_gated_session_is_still_gated(agw: GatewayProcess, oidc: OIDCProvider,
                                                    targets: Targets) -> None:
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed")
    pty = shell(agw, targets, oidc.token("agent-ci"))
    try:
        pty.send(b"TERM=xterm tmux -L guarita-gate -f /dev/null new-session bash --norc\r")
        pty.expect(rb"\x1b\[\?1049h", timeout=20)
        pty.expect(rb"bash-[0-9.]+\$ ", timeout=20)
        before = len(pty.output())
        pty.send(b"echo inside-$((2*21))\r")
        pty.expect(rb"inside-42", timeout=20)
        assert _count(pty.output()[before:]) == 0
        pty.send(b"echo needs-approval-in-tmux\r")
        pty.expect(REQUEST, timeout=20)
        pty.send(b"\x03")  # cancels the request
        pty.expect(rb"cancelled", timeout=20)
        pty.send(b"exit\r")
        pty.expect(PROMPT, timeout=20)
    finally:
        pty.close()


_ = _held  # shared helper; imported so both files deny the same way
