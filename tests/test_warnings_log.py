"""Python warnings go through the gateway's log, never raw onto stderr (issue 23, item 1b).

A dependency that warns when it is imported (cryptography's DSA deprecation through
asyncssh, for one) must not break the one-JSON-object-per-line log of ``bastion serve`` nor
print noise from commands that configure no log.
"""

from __future__ import annotations

import json
import subprocess
import sys

RAISE = (
    "import warnings, bastion\n"
    "class CryptographyDeprecationWarning(UserWarning): pass\n"
    "warnings.warn('DSA is deprecated', CryptographyDeprecationWarning)\n"
    "warnings.warn('a plain warning')\n"
)


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=60)


def test_warnings_before_the_log_is_configured_become_json_lines() -> None:
    out = _run(RAISE + "from bastion.logs import setup_logging\nsetup_logging('json', verbose=True)\n")
    lines = [json.loads(line) for line in out.stderr.splitlines()]  # every line is one JSON object
    assert [(r["level"], r["warning"]) for r in lines] == [
        ("debug", "CryptographyDeprecationWarning"), ("warning", "UserWarning")]


def test_a_dependency_deprecation_is_not_shown_without_verbose() -> None:
    out = _run(RAISE + "from bastion.logs import setup_logging\nsetup_logging('json')\n")
    lines = [json.loads(line) for line in out.stderr.splitlines()]
    assert [r["warning"] for r in lines] == ["UserWarning"]


def test_a_command_without_a_log_prints_no_warning() -> None:
    out = _run(RAISE + "print('done')\n")
    assert out.stdout == "done\n" and out.stderr == ""


def test_real_cli_commands_print_no_dependency_noise() -> None:
    for argv in (["bastion.cli", "keys", "--help"], ["replay.cli", "--help"]):
        mod = argv[0]
        code = f"import sys; sys.argv=['x', *{argv[1:]!r}]\nimport {mod}\n{mod}.main()"
        out = _run(code)
        assert out.returncode == 0 and out.stderr == "", out.stderr
