"""Approvals without processes: rule parsing and matching, the interactive command
detector fed with real terminal byte sequences, and the state store on SQLite."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from bastion.approvals.detector import CommandDetector, LineEditor
from bastion.approvals.rules import ApprovalPolicy, Context, parse_policy
from bastion.config import ConfigError, _Reader
from bastion.identity import Identity
from bastion.state import Conflict, NotFound, open_state

ALICE = Identity(issuer="https://idp", subject="alice", groups=("dev",), claims={"repository": "org/app"})
BOB = Identity(issuer="https://idp", subject="bob", groups=("sre",))


def policy(raw: dict[str, Any]) -> ApprovalPolicy:
    problems: list[tuple[str, str]] = []
    result = parse_policy(_Reader(problems, Path(".")), raw)
    if problems:
        raise ConfigError(problems)
    return result


def ctx(identity: Identity = ALICE, door: str = "ssh", target: str = "db-1", namespace: str | None = None) -> Context:
    return Context(identity=identity, front_door=door, target=target, namespace=namespace)


# -- rules -----------------------------------------------------------------------------------


def test_first_match_wins_and_default_applies() -> None:
    p = policy({"approvals": [
        {"name": "ls ok", "pattern": r"^ls\b", "action": "allow"},
        {"name": "rm", "pattern": r"\brm\s+-\w*r", "approvers": ["sre"]},
        {"name": "all ls", "pattern": "ls", "action": "deny"},
    ], "approval_defaults": {"action": "allow"}})
    assert p.command_verdict(ctx(), "ls -l").rule_name == "ls ok"
    assert p.command_verdict(ctx(), "cd / && rm -rf data").action == "approve"
    assert p.command_verdict(ctx(), "echo ls").action == "deny"
    assert p.command_verdict(ctx(), "uptime").action == "allow"
    assert p.command_verdict(ctx(), "uptime").rule is None


def test_argv_prefix_matches_each_simple_command() -> None:
    p = policy({"approvals": [{"name": "drop", "argv_prefix": ["psql", "-c"], "approvers": ["dba"]},
                              {"name": "kubectl delete", "argv_prefix": ["kubectl", "delete"], "action": "deny"}]})
    for command in ("psql -c 'drop table x'", "cd /tmp; psql -c x", "sudo psql -c x", "env A=1 psql -c y",
                    "/usr/bin/psql -c z", "true && psql   -c  w"):
        assert p.command_verdict(ctx(), command).action == "approve", command
    assert p.command_verdict(ctx(), "psql -l").action == "allow"
    assert p.command_verdict(ctx(door="kube"), "x", argv=["kubectl", "delete", "pod"]).action == "deny"


def test_scopes() -> None:
    p = policy({"approvals": [
        {"name": "prod dbs for dev", "pattern": "psql", "targets": ["db-*"], "groups": ["dev"], "approvers": ["sre"]},
        {"name": "kube prod ns", "pattern": "rm", "clusters": ["prod"], "namespaces": ["pay*"], "action": "deny"},
        {"name": "ci repo", "pattern": "deploy", "claims": {"repository": "org/*"}, "action": "deny"},
    ]})
    assert p.command_verdict(ctx(), "psql").action == "approve"
    assert p.command_verdict(ctx(target="web-1"), "psql").action == "allow"
    assert p.command_verdict(ctx(BOB), "psql").action == "allow"
    assert p.command_verdict(ctx(door="kube", target="prod", namespace="payments"), "rm x").action == "deny"
    assert p.command_verdict(ctx(door="kube", target="prod", namespace="web"), "rm x").action == "allow"
    assert p.command_verdict(ctx(door="ssh", target="prod"), "rm x").action == "allow"
    assert p.command_verdict(ctx(), "deploy now").action == "deny"
    assert p.command_verdict(ctx(BOB), "deploy now").action == "allow"


def test_shell_rules() -> None:
    p = policy({"approvals": [{"name": "agents", "groups": ["dev"], "shell": "approve", "approvers": ["sre"]}],
                "approval_defaults": {"shell": "deny"}})
    assert p.shell_verdict(ctx()).action == "approve"
    assert p.shell_verdict(ctx(BOB)).action == "deny"
    assert p.command_verdict(ctx(), "anything").action == "allow"  # shell rules never match commands


def test_normalised_spellings_match() -> None:
    p = policy({"approvals": [{"name": "rm", "pattern": r"rm -rf /", "action": "deny"}]})
    for command in ('rm  -rf   /', "rm '-rf' /", 'rm "-rf" /', "ｒｍ -rf /"):
        assert p.command_verdict(ctx(), command).action == "deny", command


@pytest.mark.parametrize("raw, key, message", [
    ({"approvals": [{"pattern": "rm (-rf"}]}, "approvals[0].pattern", "invalid regular expression"),
    ({"approvals": [{"pattern": "x", "action": "maybe", "approvers": ["a"]}]}, "approvals[0].action", "must be one of"),
    ({"approvals": [{"pattern": "x"}]}, "approvals[0].approvers", "needs approver groups"),
    ({"approvals": [{"pattern": "x", "argv_prefix": ["x"], "approvers": ["a"]}]}, "approvals[0]", "exactly one of"),
    ({"approvals": [{"pattern": "x", "approvers": ["a"], "min_approvals": 0}]}, "approvals[0].min_approvals", ""),
    ({"approvals": [{"pattern": "x", "approvers": ["a"], "timeout": "forever"}]}, "approvals[0].timeout", ""),
    ({"approvals": [{"pattern": "x", "approvers": ["a"], "colour": "red"}]}, "approvals[0].colour", "unknown key"),
    ({"approval_defaults": {"action": "approve"}}, "approval_defaults.approvers", ""),
    ({"webhooks": [{"url": "ftp://x", "format": "teams"}]}, "webhooks[0].url", ""),
    ({"approvals": {"pattern": "x"}}, "approvals", "[[approvals]]"),
])
def test_bad_rules_name_the_key(raw: dict[str, Any], key: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        policy(raw)
    assert any(k == key and message in m for k, m in info.value.problems), info.value.problems


# -- detector -------------------------------------------------------------------------------


def type_keys(d: CommandDetector, keys: bytes, echo: bytes | None = None) -> None:
    d.keys(keys)
    d.output(keys if echo is None else echo)


def prompt(d: CommandDetector, text: bytes = b"[gw]$ ") -> None:
    d.output(b"\r\n" + text)


def test_detector_typed_backspace_history_and_ctrl_c() -> None:
    d = CommandDetector(80, 24)
    d.output(b"Welcome\r\n")
    prompt(d)
    for ch in b"rm -rf /tnp":
        type_keys(d, bytes([ch]))
    type_keys(d, b"\x7f\x7f", b"\x08\x1b[K\x08\x1b[K")  # bash erases with BS + EL
    type_keys(d, b"mp")
    assert d.command() == "rm -rf /tmp"
    d.enter()
    prompt(d)
    type_keys(d, b"\x1b[A", b"rm -rf /tmp")  # history: the shell draws the line
    assert d.command() == "rm -rf /tmp"
    type_keys(d, b"\x03", b"^C")
    assert d.command() == ""
    prompt(d)
    type_keys(d, b"ls")
    assert d.command() == "ls"


def test_detector_soft_wrap_and_tab_listing() -> None:
    d = CommandDetector(30, 10)
    prompt(d)
    line = b"echo " + b"a" * 40 + b" && rm -rf /x"
    type_keys(d, line)
    assert d.command() == line.decode()
    d.enter()
    d.output(b"\r\n")
    prompt(d)
    type_keys(d, b"cat /etc/pa")
    type_keys(d, b"\t\t", b"\r\npasswd  passwd-\r\n[gw]$ cat /etc/passwd")
    assert d.command() == "cat /etc/passwd"


def test_detector_cursor_moved_left_and_clear_screen() -> None:
    d = CommandDetector(40, 10)
    prompt(d)
    type_keys(d, b"echo hi")
    type_keys(d, b"\x1b[D\x1b[D", b"\x08\x08")
    assert d.command() == "echo hi"
    type_keys(d, b"\x0c", b"\x1b[H\x1b[2J[gw]$ echo hi\x08\x08")  # Ctrl-L redraws at the top
    assert d.command() == "echo hi"


def test_detector_alternate_screen_is_not_parsed() -> None:
    d = CommandDetector(40, 10)
    prompt(d)
    type_keys(d, b"vim x")
    d.enter()
    d.output(b"\r\n\x1b[?1049h\x1b[H\x1b[2J~\r\n~ rm -rf /\r\n")
    assert d.alt_screen
    d.keys(b":wq")
    assert d.command() == ""
    d.output(b"\x1b[?10")  # a switch cut in two chunks
    d.output(b"49l")
    assert not d.alt_screen
    prompt(d)
    type_keys(d, b"ls")
    assert d.command() == "ls"


def test_detector_blind_typeahead_and_bracketed_paste() -> None:
    d = CommandDetector(60, 10)
    prompt(d)
    type_keys(d, b"sleep 1")
    d.enter()
    d.keys(b"rm -rf /x")  # typed before the shell answered: no prompt to anchor on
    assert d.blind
    d.output(b"\r\n[gw]$ rm -rf /x")
    assert d.command() == "rm -rf /x"
    d.enter()
    d.output(b"\r\n")
    prompt(d)
    type_keys(d, b"\x1b[200~echo a\recho b\x1b[201~", b"echo a\r\necho b")
    assert d.command() == "echo a\necho b"


def test_detector_large_output_is_bounded() -> None:
    d = CommandDetector(80, 24, tail_limit=4096)
    prompt(d)
    type_keys(d, b"cat big")
    d.enter()
    for _ in range(200):
        d.output(b"x" * 1000 + b"\r\n")
    assert d._pending_len <= 2 * 4096
    prompt(d)
    type_keys(d, b"uptime")
    assert d.command() == "uptime"


def fed_chars(d: CommandDetector) -> list[int]:
    """Counts the characters the detector feeds its terminal emulator."""
    count = [0]
    feed = d.stream.feed

    def counting(text: str) -> None:
        count[0] += len(text)
        feed(text)

    d.stream.feed = counting  # type: ignore[method-assign]
    return count


def big_output(d: CommandDetector, lines: int, line: bytes = b"%d") -> None:
    block = b"".join(line.replace(b"%d", str(i).encode()) + b"\r\n" for i in range(lines))
    for i in range(0, len(block), 4096):  # the size the gateway relays
        d.output(block[i:i + 4096])


@pytest.mark.parametrize("line", [b"%d", b"\x1b[32mINFO\x1b[0m request %d served from cache, 200 OK in 3 ms"])
def test_detector_first_key_after_big_output_feeds_one_screen(line: bytes) -> None:
    """The catch-up runs on the event loop: after ~100,000 lines the first key feeds the
    emulator about one screen, not the backlog (bench/approval_detector_stall)."""
    d = CommandDetector(80, 24)
    prompt(d)
    type_keys(d, b"seq 100000")
    d.enter()
    fed = fed_chars(d)
    big_output(d, 100_000, line)
    prompt(d)
    d.keys(b"r")
    assert fed[0] <= 80 * 24
    assert d.screen.display[-3].startswith("99999" if line == b"%d" else "INFO request 99999")
    d.output(b"r")
    type_keys(d, b"m -rf /x")
    assert d.command() == "rm -rf /x"


def test_detector_soft_wrapped_line_after_big_output() -> None:
    d = CommandDetector(30, 10)
    big_output(d, 50_000)
    fed = fed_chars(d)
    prompt(d)
    command = b"echo " + b"a" * 150 + b" && rm -rf /x"  # 6 rows of 30
    type_keys(d, command)
    assert d.command() == command.decode()
    assert fed[0] <= 30 * 10


def test_detector_line_longer_than_the_screen_is_read_as_shown() -> None:
    """The documented limit: a command line longer than the screen has lost its start (and
    the prompt) off the top; the command read is what the screen shows, as before the tail
    was bounded; a plain long line is cut at a row boundary, so the rows are the shell's."""
    d = CommandDetector(30, 10)
    big_output(d, 50_000)
    prompt(d)
    body = "".join(f"{i:04d} " for i in range(2000)).encode()  # 10,000 characters, ~333 rows
    type_keys(d, b"echo " + body)
    shown = d.command()
    assert 9 * 30 <= len(shown) <= 10 * 30 and body.decode().rstrip().endswith(shown)
    assert d.cut_off  # so the gate checks the typed text too


def test_detector_flags_a_line_whose_start_scrolled_off() -> None:
    """A long padded line pushes its start (and the prompt) off the screen; the detector
    says so, so that the typed text, which holds the start, is checked as well."""
    d = CommandDetector(20, 5)
    prompt(d)
    line = b"rm -rf /data #" + b" " * 150 + b"echo hi"
    type_keys(d, line)
    assert "rm" not in d.command() and d.cut_off
    d.enter()
    prompt(d)
    type_keys(d, b"ls")
    assert d.command() == "ls" and not d.cut_off


def test_detector_backlog_with_cursor_moves_falls_back_to_tail_limit() -> None:
    """Output that moves the cursor up throughout (progress bars) cannot be cut to a
    screen: the emulator gets the last tail_limit characters, from a line start."""
    d = CommandDetector(80, 24)
    assert d.tail_limit == 16 * 1024
    fed = fed_chars(d)
    big_output(d, 20_000, b"\x1b[1A\x1b[2Kstep %d of 20000")
    prompt(d)
    d.keys(b"l")
    assert 8 * 1024 < fed[0] <= d.tail_limit
    type_keys(d, b"s", b"ls")
    assert d.command() == "ls"


def test_line_editor() -> None:
    e = LineEditor()
    e.keys(b"rm -rf /tmpx\x7f \x17ls\x1b[D -l")
    assert e.line() == "rm -rf ls -l"
    e.keys(b"\x15echo ok")
    assert e.line() == "echo ok"


# -- state store ------------------------------------------------------------------------------


def request_values(**kw: Any) -> dict[str, Any]:
    return {"session_id": "s1", "requester": ALICE.to_dict(), "requester_issuer": ALICE.issuer,
            "requester_subject": ALICE.subject, "front_door": "ssh", "kind": "exec", "target": "db-1",
            "command": "rm -rf /", "rule": "r", "approver_groups": ["sre"], "min_approvals": 2,
            "expires": time.time() + 60, **kw}


def test_state_store_sqlite(tmp_path: Path) -> None:
    async def main() -> None:
        st = open_state(f"sqlite:///{tmp_path}/state.db", "test")
        await st.start()
        try:
            r = await st.create_request(request_values())
            assert r["status"] == "pending" and len(r["id"]) == 10
            a = await st.decide(r["id"], {"issuer": "i", "subject": "bob"}, "approve", "one")
            assert a["status"] == "pending"
            with pytest.raises(Conflict):
                await st.decide(r["id"], {"issuer": "i", "subject": "bob"}, "approve", "again")
            waiter = asyncio.create_task(st.wait_request(r["id"], 10))
            await asyncio.sleep(0)
            t0 = time.monotonic()
            await st.decide(r["id"], {"issuer": "i", "subject": "carol"}, "approve", "two")
            done = await waiter
            assert done["status"] == "approved" and time.monotonic() - t0 < 0.5
            assert [d["approver"]["subject"] for d in done["decisions"]] == ["bob", "carol"]
            with pytest.raises(Conflict):
                await st.decide(r["id"], {"issuer": "i", "subject": "dave"}, "deny", "late")
            with pytest.raises(NotFound):
                await st.decide("nope", {"issuer": "i", "subject": "dave"}, "deny", "x")
            # Timeouts and cancels never turn into approvals.
            r2 = await st.create_request(request_values(min_approvals=1))
            assert (await st.wait_request(r2["id"], 0.05))["status"] == "pending"
            assert (await st.finish_request(r2["id"], "expired", "slow"))["status"] == "expired"
            with pytest.raises(Conflict):
                await st.decide(r2["id"], {"issuer": "i", "subject": "bob"}, "approve", "late")
            # A request of a replica that is gone is expired at the next sweep.
            r3 = await st.create_request(request_values(replica_id="dead-replica"))
            assert [x["id"] for x in await st.expire_orphans()] == [r3["id"]]
            assert (await st.get_request(r3["id"]))["status_reason"].startswith("the gateway holding")
            await st.add_command("s1", 1.5, "ls -l", "allowed")
            assert [c["command"] for c in await st.search_commands("ls")] == ["ls -l"]
            await st.add_live_session({"id": "s1", "identity": ALICE.to_dict(), "subject": "alice",
                                       "front_door": "ssh", "target": "db-1"})
            await st.update_live_sessions([("s1", 10, 20)])
            assert [(s["id"], s["bytes_out"]) for s in await st.list_live_sessions()] == [("s1", 20)]
        finally:
            await st.close()
        # A restart keeps every request, pending ones of the earlier run become expired.
        st2 = open_state(f"sqlite:///{tmp_path}/state.db", "test")
        await st2.start()
        try:
            r4 = await st2.create_request(request_values())
            await st2.close()
            st3 = open_state(f"sqlite:///{tmp_path}/state.db", "test")
            await st3.start()
            assert [x["id"] for x in await st3.expire_orphans()] == [r4["id"]]
            assert len(await st3.list_requests()) == 4
            await st3.close()
        finally:
            await st2.close()

    asyncio.run(main())


def test_state_url_errors() -> None:
    from bastion.state import StateError, engine_url

    assert engine_url("sqlite:////tmp/x.db")[0] == "sqlite"
    assert engine_url("postgresql://u@h:5432/db")[1].startswith("postgresql+asyncpg://")
    for bad in ("mysql://x/y", "sqlite://", "nonsense"):
        with pytest.raises(StateError):
            engine_url(bad)


class _GateSession:
    """What InteractiveGate uses of a Session: where its bytes and markers go."""

    id = "s-test"

    def __init__(self) -> None:
        self.upstream = bytearray()

    def send_upstream(self, data: bytes) -> None:
        self.upstream += data

    def say(self, text: str) -> None:
        pass

    def to_client(self, data: bytes) -> None:
        pass

    def marker(self, kind: str, **fields: Any) -> None:
        pass

    def cancel_approval(self, reason: str) -> None:
        pass


class _GateEngine:
    def __init__(self, deny: tuple[str, ...] = ()) -> None:
        self.checked: list[tuple[str, tuple[str, ...]]] = []
        self.deny = deny

    async def check(self, session: Any, command: str, kind: str, *, also: tuple[str, ...] = (),
                    record: bool = True) -> Any:
        self.checked.append((command, also))
        allowed = command not in self.deny
        return type("Result", (), {"allowed": allowed, "outcome": "allowed" if allowed else "denied",
                                   "reason": "" if allowed else "denied by a test rule"})()


async def _gate_enter(monkeypatch: pytest.MonkeyPatch, prompt: bytes, typed: bytes, echo: bytes) -> _GateEngine:
    """Type ``typed`` and Enter at ``prompt``; only ``echo`` comes back before the gate gives up."""
    from bastion.approvals import interactive
    monkeypatch.setattr(interactive, "MAX_SETTLE", 0.05)
    session, engine = _GateSession(), _GateEngine()
    gate = interactive.InteractiveGate(session, engine, 80, 24)  # type: ignore[arg-type]
    gate.output(prompt)
    assert gate.input(typed + b"\r") == typed
    gate.output(echo)
    deadline = time.monotonic() + 5
    while gate._task is not None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert session.upstream == b"\r"  # the held Enter went on
    return engine


def test_gate_judges_the_typed_line_when_its_echo_lags(monkeypatch: pytest.MonkeyPatch) -> None:
    # A loaded target echoed only the start of the line within the settle window: the
    # command is the typed line, whole, and the fragment on screen is checked as well.
    engine = asyncio.run(_gate_enter(monkeypatch, b"$ ", b"echo one-$((1+1))", b"echo one-$"))
    assert engine.checked == [("echo one-$((1+1))", ("echo one-$",))]


def test_gate_never_takes_typed_text_for_an_empty_screen(monkeypatch: pytest.MonkeyPatch) -> None:
    # No echo at all (a password prompt): the typed text is only a second opinion.
    engine = asyncio.run(_gate_enter(monkeypatch, b"Password: ", b"hunter2", b""))
    assert engine.checked and engine.checked[0][0] != "hunter2"


def test_gate_judges_typed_ahead_line_not_the_row_that_echoes_it_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # A pasted second line reaches the target while the first runs: the terminal echoes it,
    # then the shell prints its prompt and shows the line again, all on one row.
    from bastion.approvals import interactive

    async def run() -> _GateEngine:
        monkeypatch.setattr(interactive, "MAX_SETTLE", 0.05)
        session, engine = _GateSession(), _GateEngine()
        gate = interactive.InteractiveGate(session, engine, 80, 24)  # type: ignore[arg-type]
        gate.output(b"$ ")
        assert gate.input(b"echo a\recho b\r") == b"echo a"
        gate.output(b"echo a")
        deadline = time.monotonic() + 5
        while not session.upstream.endswith(b"echo b") and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        gate.output(b"\r\na\r\necho b$ echo b")
        while gate._task is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert session.upstream == b"\recho b\r"
        return engine

    engine = asyncio.run(run())
    assert engine.checked == [("echo a", ()), ("echo b", ("echo b$ echo b",))]


def test_gate_judges_the_typed_line_when_the_boundary_lands_inside_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first key was typed while a stale character stood right of the prompt; the shell
    # then redrew the line. Read from that boundary, the screen misses the first letter.
    engine = asyncio.run(_gate_enter(monkeypatch, b"$ e", b"echo hi", b"\r$ echo hi"))
    assert engine.checked == [("echo hi", ("cho hi",))]


def test_gate_judges_the_typed_line_when_a_learnt_prompt_swallows_its_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # Typed before any output since the last Enter (blind), the line is read from the row's
    # start less the last prompt; a prompt learnt from a half-redrawn screen ("$ e") then
    # takes the first letter with it.
    from bastion.approvals import interactive

    async def run() -> _GateEngine:
        monkeypatch.setattr(interactive, "MAX_SETTLE", 0.05)
        session, engine = _GateSession(), _GateEngine()
        gate = interactive.InteractiveGate(session, engine, 80, 24)  # type: ignore[arg-type]
        gate.output(b"$ ")
        gate.det.enter()
        gate.det.last_prompt = "$ e"
        assert gate.input(b"echo hi\r") == b"echo hi"
        gate.output(b"echo hi")
        deadline = time.monotonic() + 5
        while gate._task is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return engine

    assert asyncio.run(run()).checked == [("echo hi", ("cho hi",))]


def test_gate_takes_keys_typed_during_a_refusal_as_a_new_line(monkeypatch: pytest.MonkeyPatch) -> None:
    # A refused line: while the gate lets the shell erase it, the agent types the next
    # command. Those keys are a line of their own (not an Enter followed by the rest).
    from bastion.approvals import interactive

    async def run() -> tuple[_GateSession, _GateEngine]:
        monkeypatch.setattr(interactive, "MAX_SETTLE", 0.2)
        session, engine = _GateSession(), _GateEngine(deny=("rm x",))
        gate = interactive.InteractiveGate(session, engine, 80, 24)  # type: ignore[arg-type]
        gate.output(b"$ ")
        assert gate.input(b"rm x\r") == b"rm x"
        gate.output(b"rm x")
        deadline = time.monotonic() + 5
        while len(engine.checked) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert gate.input(b"echo ok\r") == b""  # held behind the refusal
        gate.output(b"\r$ \x1b[K")  # the shell erased its line
        while not session.upstream.endswith(b"echo ok") and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        gate.output(b"echo ok")
        while len(engine.checked) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        while gate._task is not None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return session, engine

    session, engine = asyncio.run(run())
    assert engine.checked == [("rm x", ()), ("echo ok", ())]  # what was typed is the line on screen
    assert session.upstream == interactive.CLEAR_LINE + b"echo ok\r"


# -- issue 23 item 8: echoed lines are input, never hidden ------------------------------------


class _Rec:
    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []

    def now(self) -> float:
        return 0.0

    def input(self, data: bytes) -> None:
        self.events.append(("i", data))

    def input_at(self, t: float, data: bytes) -> None:
        self.events.append(("i", data))

    def marker(self, kind: str, **fields: object) -> None:
        self.events.append((kind, fields))


def _tracker() -> tuple[object, _Rec]:
    from bastion.session import EchoTracker

    rec = _Rec()
    return EchoTracker(rec), rec  # type: ignore[arg-type]


def test_a_line_echoed_in_pieces_or_late_is_input_not_hidden() -> None:
    echo, rec = _tracker()
    echo.typed(b"exit\r")  # type: ignore[attr-defined]
    echo.output(b"\x1b[?2004l\r")  # type: ignore[attr-defined]  # not the echo yet
    echo.output(b"ex")  # type: ignore[attr-defined]
    echo.output(b"it\r\nlogout\r\n")  # type: ignore[attr-defined]
    echo.close()  # type: ignore[attr-defined]
    assert [e for e in rec.events if e[0] == "hidden-input"] == []
    assert b"".join(d for k, d in rec.events if k == "i") == b"exit\r"  # type: ignore[misc]
    # Typed ahead of a slow prompt: the running command's output comes first, the echo later.
    echo, rec = _tracker()
    echo.typed(b"ls -l\r")  # type: ignore[attr-defined]
    echo.output(b"still running...\r\n" * 20)  # type: ignore[attr-defined]
    echo.output(b"[gw]$ ls -l\r\n")  # type: ignore[attr-defined]
    echo.close()  # type: ignore[attr-defined]
    assert [e for e in rec.events if e[0] == "hidden-input"] == []


def test_a_password_is_still_hidden() -> None:
    echo, rec = _tracker()
    echo.typed(b"s3cret-pw\r")  # type: ignore[attr-defined]
    echo.output(b"\r\n")  # type: ignore[attr-defined]
    echo.output(b"welcome\r\n[gw]$ ")  # type: ignore[attr-defined]
    echo.close()  # type: ignore[attr-defined]
    assert [f for k, f in rec.events if k == "hidden-input"] == [{"length": 9, "reason": (
        "typed while the terminal did not echo (e.g. a password prompt)")}]
    assert b"s3cret" not in b"".join(d for k, d in rec.events if k == "i")  # type: ignore[misc]
