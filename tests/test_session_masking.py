"""The session's masking flush timer, in process: a real Gateway (SQLite state, file://
recordings in a temporary folder) and a Session fed by hand, as a front door feeds it."""

from __future__ import annotations

import asyncio
from pathlib import Path

from bastion.config import load_config
from bastion.gateway import Gateway
from bastion.identity.model import Identity
from bastion.session import Session, SessionInfo

CPF = b"529.982.247-25"


def _config(tmp: Path) -> Path:
    path = tmp / "guarita.toml"
    path.write_text(f"""
[gateway]
data_dir = "{tmp}"

[recording]
url = "{(tmp / 'recordings').as_uri()}"

[[oidc]]
issuer = "https://issuer.invalid"
audience = "guarita"

[[targets]]
name = "web"
host = "127.0.0.1"
port = 22
logins = ["deploy"]
credential = "ca"
host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKbM5mZ7f0fZ3Y7nq6w6Ql6kq1q9r8m6b4y2Zt1Zt0Zt"]

[[access]]
name = "sre"
groups = ["sre"]
targets = ["web"]

[masking]
default_apply = "both"
""")
    return path


async def _session(tmp: Path) -> tuple[Gateway, Session, list[bytes]]:
    """A real gateway and an exec session on it; what the session releases on its own
    (the silence flush) lands in the list."""
    gw = Gateway(load_config(_config(tmp)))
    await gw.recorder.start()
    info = SessionInfo(front_door="ssh", identity=Identity("https://issuer.invalid", "agent", ("sre",)),
                       source="127.0.0.1", target="web", login="deploy", kind="exec", command="x")
    session = Session(gw, info)
    released: list[bytes] = []
    session.deliver_output = lambda data, stream: released.append(data)
    return gw, session, released


def _run(tmp: Path, held: bool) -> tuple[bytes, bytes]:
    """What the agent gets when a CPF's second half comes after a long gap: with the target
    held by the gateway (``held``), or silent on its own."""

    async def scenario() -> tuple[bytes, bytes]:
        gw, session, released = await _session(tmp)
        shown = session.from_target(b"cpf=" + CPF[:8])  # could be the start of a CPF: held back
        if held:
            session.hold_target(True)  # the agent is slower: the front door stopped reading
        session._mask_fed -= 1.0  # the last output came a second ago (no waiting in a test)
        session._mask_silence()  # the silence timer fires
        early = shown + b"".join(released)
        if held:
            session.hold_target(False)
        shown += session.from_target(CPF[8:] + b" ok\n")
        await session.end(0)
        await gw.recorder.close()
        return early, shown + b"".join(released)

    return asyncio.run(scenario())


def test_a_pause_of_the_gateways_making_does_not_cut_a_value(tmp_path: Path) -> None:
    early, seen = _run(tmp_path, held=True)
    assert early == b"cpf="  # the tail is still held while the gateway holds the target
    assert seen == b"cpf=***.***.***-** ok\n"


def test_the_targets_own_silence_does_not_cut_a_value(tmp_path: Path) -> None:
    """Masking decides on content, never on time: a value split by the target's (or its
    link's) silence is still one value."""
    early, seen = _run(tmp_path, held=False)
    assert early == b"cpf="
    assert seen == b"cpf=***.***.***-** ok\n"


def test_silence_shows_the_agent_only_the_echo_of_its_own_typing(tmp_path: Path) -> None:
    """The live view gets a held tail early only when it is what the agent typed; the
    recording still waits for the bytes that decide it, and masks the value they complete."""

    async def scenario() -> tuple[bytes, list[bytes]]:
        gw, session, released = await _session(tmp_path)
        session.from_client(b"ana")
        shown = session.from_target(b"$ ana")  # the echo: could be an address's start
        session._mask_fed -= 1.0
        session._mask_silence()
        early = list(released)
        shown += session.from_target(b"529")  # not typed: stays held through the silence
        session._mask_fed -= 1.0
        session._mask_silence()
        early.append(b"".join(released[len(early):]))
        shown += session.from_target(b"@example.com\r\n")
        await session.end(0)
        await gw.recorder.close()
        return shown, early

    shown, early = asyncio.run(scenario())
    assert early == [b"ana", b""]  # the echo at once; "529", which the agent did not type, not
    assert shown == b"$ " + b"***@*******.***\r\n"  # the rest of "ana529@example.com", masked


def test_masked_output_goes_out_no_larger_than_it_came_in(tmp_path: Path) -> None:
    """The masker's released tail waits for the next chunk: a chunk of the channel's packet
    size never turns into a full packet plus a tiny one. Nothing is lost or reordered."""

    async def scenario() -> tuple[list[bytes], list[bytes], bytes, int]:
        gw, session, released = await _session(tmp_path)
        # Chunks that end in digits (held back) and start with the rest of them (released).
        text = b"".join(b"line %d id=1234567 cpf=%s\n" % (i, CPF) for i in range(10000))
        chunks = [text[i:i + 9001] for i in range(0, len(text), 9001)]
        shown, carried = [], 0
        for c in chunks:
            shown.append(session.from_target(c))
            carried += bool(session._carry.get("o"))
        await session.end(0)
        await gw.recorder.close()
        return chunks, shown, b"".join(shown) + b"".join(released), carried

    chunks, shown, seen, carried = asyncio.run(scenario())
    # every chunk but the last, which is smaller than _PACE_MIN and goes out whole
    assert all(len(s) <= len(c) for s, c in zip(shown[:-1], chunks[:-1], strict=True))
    assert carried > 10  # released tails did wait for the next chunk
    expected = b"".join(b"line %d id=1234567 cpf=***.***.***-**\n" % i for i in range(10000))
    assert seen == expected


def test_small_chunks_are_not_paced(tmp_path: Path) -> None:
    """Interactive output (an echo, a prompt) goes out whole: only bulk output is paced."""

    async def scenario() -> tuple[bytes, bytes]:
        gw, session, released = await _session(tmp_path)
        first = session.from_target(b"x=12")  # could grow into a value: held
        second = session.from_target(b"34\n$ ")  # releases it, with more than came in
        await session.end(0)
        await gw.recorder.close()
        return first, second

    first, second = asyncio.run(scenario())
    assert first == b"x=" and second == b"1234\n$ "


def test_a_value_drawn_out_of_order_leaves_an_unmasked_region_marker(tmp_path: Path) -> None:
    """A true limit, shown to auditors: digits on both sides of a cursor jump."""

    async def scenario() -> list[dict]:
        gw, session, _ = await _session(tmp_path)
        seen: list[dict] = []
        marker = session.recording.marker
        session.recording.marker = lambda kind, **f: (seen.append({"type": kind, **f}), marker(kind, **f))[1]  # type: ignore[method-assign]
        session.from_target(b"cpf 529.982\x1b[5G.247-25 ok\n")
        session.from_target(b"plain 12 and 34\n")
        await session.end(0)
        await gw.recorder.close()
        return seen

    seen = asyncio.run(scenario())
    regions = [m for m in seen if m["type"] == "masking" and "unmasked_region" in m]
    assert [(m["stream"], m["count"]) for m in regions] == [("o", 1)]
