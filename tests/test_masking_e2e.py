"""Masking end to end: real ssh through the gateway to a real sshd.

What the agent sees and what the recording stores hold no original value; the masking
log (markers) holds detector, position and the keyed hash an auditor can recompute.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bastion.masking import default_detectors, mask_bytes
from bastion.masking.detectors import hmac_value
from bastion.masking.samples import card, cpf, email
from bastion.masking.stream import marker_values
from tests.conftest import GatewayProcess, Targets, bastion_bin, gateway_config, target_block
from tests.support.oidc import OIDCProvider
from tests.support.openssh import PtySsh, run_ssh

RNG = random.Random(20261125)
VALUES = {"cpf": cpf(RNG, True), "email": email(RNG), "card": card(RNG, 16, " ")}


@pytest.fixture(scope="module")
def masking_gateway(request: pytest.FixtureRequest, oidc: OIDCProvider, targets: Targets,
                    tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tests.conftest import GatewayProcess as Process

    data_dir = tmp_path_factory.mktemp("masking-gw")
    t = targets
    text = gateway_config(
        data_dir, [(oidc.issuer, "5s")],  # type: ignore[list-item]
        "\n".join([
            target_block("masked", t.web_key.port, [t.login], [t.web_key.host_key_line], "key", t.gateway_key),
            target_block("recorded-only", t.web_key.port, [t.login], [t.web_key.host_key_line], "key",
                         t.gateway_key),
        ]),
        '[[access]]\nname = "sre"\ngroups = ["sre"]\n',
    )
    text += '''
[masking]
default_apply = "both"

[[masking.rules]]
targets = ["recorded-only"]
apply = "recording"
'''
    (data_dir / "guarita.toml").write_text(text)
    gw = Process(data_dir / "guarita.toml", data_dir)
    gw.start()
    yield gw
    gw.stop()


def _printf(values: dict[str, str]) -> str:
    return "printf '%s\\n' " + " ".join(f"'{k}={v}'" for k, v in values.items())


def _shown(command: str) -> str:
    """A command line as the gateway keeps it (audit log, metadata): masked."""
    return mask_bytes(default_detectors(), b"any", command.encode())[0].decode()


def _secret(gw: GatewayProcess) -> bytes:
    from bastion.masking.config import load_or_create_secret

    return load_or_create_secret(gw.data_dir / "masking.key")


def _masked(events: list[Any], streams: tuple[str, ...] = ("o", "e")) -> list[dict[str, Any]]:
    """Every value of the recording's masking markers (one marker per output chunk) of
    ``streams`` (``o``/``e`` output, ``i`` input, ``command`` the exec command line)."""
    return [v for e in events if e.code == "m" and e.data.get("type") == "masking"
            and e.data.get("stream") in streams for v in marker_values(e.data)]


def _check_recording(gw: GatewayProcess, events: list[Any], expect_clean: bool) -> None:
    recorded = b"".join(e.stream_bytes() or b"" for e in events if e.stream in ("o", "e"))
    for value in VALUES.values():
        assert value.encode() not in recorded, f"{value} stored in the recording"
    markers = _masked(events)
    assert sorted(m["detector"] for m in markers) == sorted(VALUES)
    secret = _secret(gw)
    for m in markers:
        assert m["hmac"] == hmac_value(secret, m["detector"], VALUES[m["detector"]])
        assert VALUES[m["detector"]] not in str(m)


def test_exec_output_is_masked_for_the_agent_and_the_recording(masking_gateway: GatewayProcess,
                                                               oidc: OIDCProvider) -> None:
    gw = masking_gateway
    # The compiled engine masks here (.ci/install-deps builds it); the Python masker is
    # checked against it in tests/test_masking_engine.py.
    assert '"masking: compiled engine"' in gw.log_text()
    mark = gw.audit_mark()
    r = run_ssh(["-p", str(gw.ssh_port), "masked@127.0.0.1", _printf(VALUES) + "; echo done"],
                token=oidc.token("agent-sre"))
    assert r.returncode == 0, r.stderr
    for value in VALUES.values():
        assert value.encode() not in r.stdout
    assert b"cpf=***.***.***-**" in r.stdout and r.stdout.endswith(b"done\n")
    sid, manifest, events = gw.session_recording(mark, command=_shown(_printf(VALUES) + "; echo done"))
    _check_recording(gw, events, expect_clean=True)
    client = r.stdout
    recorded = b"".join(e.stream_bytes() or b"" for e in events if e.stream == "o")
    assert recorded == client  # the recording is exactly what the agent saw
    # each value twice: in the command line (kept masked) and in the output
    assert manifest["end"]["masking"] == {"cpf": 2, "email": 2, "card": 2}
    assert sorted(m["detector"] for m in _masked(events, ("command",))) == sorted(VALUES)
    # The auditor's question, with the CLI: was this CPF masked in that session?
    asked = subprocess.run([*bastion_bin(), "mask-hash", "--config", str(gw.config_path), "cpf", VALUES["cpf"]],
                           capture_output=True, text=True, timeout=60)
    assert asked.returncode == 0, asked.stderr
    assert asked.stdout.strip() in {m["hmac"] for m in _masked(events)}
    assert manifest["session"]["masking"] == "both"
    listed = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "ls", "--masked"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and "MASKED" in listed.stdout.splitlines()[0], listed.stderr
    assert [line for line in listed.stdout.splitlines() if line.startswith(sid)][0].split()[8:11] == [
        "card:2", "cpf:2", "email:2"]  # per-detector counts, per session
    # ... and across sessions, from the recordings alone: where was it masked?
    found = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "masked",
                            asked.stdout.strip(), "--json"], capture_output=True, text=True, timeout=60)
    assert found.returncode == 0, found.stderr
    places = [json.loads(line) for line in found.stdout.splitlines()]
    assert {(p["session"], p["detector"], p["stream"]) for p in places} >= {(sid, "cpf", "o")}
    assert VALUES["cpf"] not in found.stdout
    unknown = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "masked",
                              "0" * 64], capture_output=True, text=True, timeout=60)
    assert unknown.returncode == 1 and "not masked in any session" in unknown.stderr
    bad = subprocess.run([sys.executable, "-m", "replay.cli", "--config", str(gw.config_path), "masked",
                          VALUES["cpf"]], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "bastion mask-hash" in bad.stderr and "Traceback" not in bad.stderr


def test_recording_only_policy_shows_the_agent_the_original(masking_gateway: GatewayProcess,
                                                            oidc: OIDCProvider) -> None:
    gw = masking_gateway
    mark = gw.audit_mark()
    command = _printf(VALUES)
    r = run_ssh(["-p", str(gw.ssh_port), "recorded-only@127.0.0.1", command], token=oidc.token("agent-sre"))
    assert r.returncode == 0, r.stderr
    assert VALUES["cpf"].encode() in r.stdout
    _, manifest, events = gw.session_recording(mark, command=_shown(command))
    _check_recording(gw, events, expect_clean=True)
    assert manifest["session"]["masking"] == "recording"


def test_interactive_prompt_output_is_masked_and_released(masking_gateway: GatewayProcess,
                                                          oidc: OIDCProvider, tmp_path: Path) -> None:
    gw = masking_gateway
    mark = gw.audit_mark()
    with PtySsh(["-tt", "-p", str(gw.ssh_port), "masked@127.0.0.1"], token=oidc.token("agent-sre")) as pty:
        pty.expect(rb"[$#] ")
        # The value is split over two writes with a colour code inside: still found.
        pty.send(b"printf 'id %s\\033[31m%s\\033[0m\\n' " + VALUES["cpf"][:6].encode() + b" "
                 + VALUES["cpf"][6:].encode() + b"\r")
        pty.expect(rb"id \*\*\*\.\*\*\x1b\[31m\*\.\*\*\*-\*\*\x1b\[0m")  # masked, colour kept
        # A prompt with no newline after a masked value is released after a few ms of silence.
        pty.send(b"printf 'mail: %s' " + VALUES["email"].encode() + b"\r")
        pty.expect(rb"mail: \*+@\*+\.\*+")
        pty.send(b"exit\r")
        assert pty.wait() == 0
        seen = pty.output()
    assert VALUES["email"].encode() not in seen.split(b"mail: ")[-1]
    _, _, events = gw.session_recording(mark, kind="shell")
    detectors = sorted(m["detector"] for m in _masked(events))
    assert "cpf" in detectors and "email" in detectors
