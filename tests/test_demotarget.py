"""The --dev demo SSH target, driven by a real asyncssh client."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from bastion.demo.sshtarget import DemoTarget

DEADLINE = 10.0  # seconds; each test must finish well inside it


def keygen() -> asyncssh.SSHKey:
    return asyncssh.generate_private_key("ssh-ed25519")


HOST_KEY = keygen()
USER_KEY = keygen()
CA_KEY = keygen()


def run(test: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(test(), DEADLINE))


@asynccontextmanager
async def demo(**kwargs: Any) -> AsyncIterator[DemoTarget]:
    kwargs.setdefault("authorized_key", USER_KEY)
    target = DemoTarget(HOST_KEY, shell="/bin/sh", **kwargs)
    await target.start()
    try:
        yield target
    finally:
        await target.stop()


def connect(target: DemoTarget, key: Any = USER_KEY, **kwargs: Any) -> Any:
    return asyncssh.connect(
        target.host,
        target.port,
        username="whoever",
        known_hosts=None,
        client_keys=[key],
        **kwargs,
    )


@asynccontextmanager
async def session() -> AsyncIterator[asyncssh.SSHClientConnection]:
    async with demo() as target, connect(target) as conn:
        yield conn


def test_start_binds_a_real_port() -> None:
    async def go() -> None:
        async with demo() as target:
            assert target.host == "127.0.0.1"
            assert target.port > 0

    run(go)


def test_exec_keeps_stderr_separate_and_reports_exit_status() -> None:
    async def go() -> None:
        async with session() as conn:
            result = await conn.run("echo out; echo err >&2; exit 3")
        assert result.stdout == "out\n"
        assert result.stderr == "err\n"
        assert result.exit_status == 3

    run(go)


def test_stdin_is_piped_and_eof_closes_it() -> None:
    async def go() -> None:
        async with session() as conn:
            result = await conn.run("cat; echo done", input="hello\n")
        assert result.stdout == "hello\ndone\n"
        assert result.exit_status == 0

    run(go)


def test_binary_round_trip_through_cat() -> None:
    payload = bytes(range(256)) * 4096  # 1 MiB, every byte value

    async def go() -> None:
        async with session() as conn:
            result = await conn.run("cat", input=payload, encoding=None)
        assert result.stdout == payload

    run(go)


def test_client_env_and_gateway_identity_reach_the_child() -> None:
    async def go() -> None:
        async with session() as conn:
            result = await conn.run(
                'echo "$LANG|$FOO|$HOME|$USER|$PATH"', env={"LANG": "C.UTF-8", "FOO": "bar"}
            )
        lang, foo, home, user, path = str(result.stdout).rstrip("\n").split("|")
        assert (lang, foo) == ("C.UTF-8", "bar")
        assert home and user and path
        assert user != "whoever"  # runs as the gateway's OS user, not the SSH username

    run(go)


def test_pty_shell_gets_size_term_and_window_changes() -> None:
    async def go() -> None:
        async with session() as conn:
            proc = await conn.create_process(term_type="xterm-256color", term_size=(100, 40))
            proc.stdin.write('echo "T=$TERM"; stty size\n')
            await proc.stdout.readuntil("T=xterm-256color")
            await proc.stdout.readuntil("40 100")
            proc.change_terminal_size(120, 50)
            proc.stdin.write("stty size\n")
            await proc.stdout.readuntil("50 120")
            proc.stdin.write("exit 7\n")
            await proc.wait()
        assert proc.exit_status == 7

    run(go)


def test_pty_trailing_output_is_not_lost() -> None:
    async def go() -> None:
        async with session() as conn:
            for i in range(5):
                result = await conn.run(f"printf 'last words {i}'", term_type="xterm")
                assert result.stdout == f"last words {i}"
                assert result.exit_status == 0

    run(go)


def test_client_signal_reaches_child_and_exit_signal_comes_back() -> None:
    async def go() -> None:
        async with session() as conn:
            proc = await conn.create_process("echo ready; sleep 30")
            await proc.stdout.readline()
            proc.send_signal("TERM")
            await proc.wait()
        assert proc.exit_signal is not None
        assert proc.exit_signal[0] == "TERM"

    run(go)


def test_large_output_arrives_intact() -> None:
    size = 20_000_000
    expected = (b"0123456789abcdef\n" * (size // 17 + 1))[:size]

    async def go() -> None:
        async with session() as conn:
            proc = await conn.create_process(
                f"yes 0123456789abcdef | head -c {size}", encoding=None
            )
            chunks = []
            while chunk := await proc.stdout.read(1 << 20):
                chunks.append(chunk)
            await proc.wait()
        data = b"".join(chunks)
        assert len(data) == size
        assert data == expected
        assert proc.exit_status == 0

    run(go)


def test_slow_reader_blocks_the_child_instead_of_buffering() -> None:
    # stdout is never read, so the client's window closes; a target that
    # buffered without bound would let head finish and "finished" arrive.
    async def go() -> None:
        async with session() as conn:
            proc = await conn.create_process(
                "head -c 200000000 /dev/zero; echo finished >&2", encoding=None
            )
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(proc.stderr.readline(), 1.0)
            proc.close()

    run(go)


def test_wrong_key_is_refused() -> None:
    async def go() -> None:
        async with demo() as target:
            with pytest.raises(asyncssh.PermissionDenied):
                async with connect(target, key=keygen()):
                    pass

    run(go)


def test_certificate_from_trusted_ca_is_accepted() -> None:
    user_key = keygen()
    cert = CA_KEY.generate_user_certificate(user_key, "id", valid_before=int(time.time()) + 3600)

    async def go() -> None:
        async with demo(authorized_key=None, trusted_ca=CA_KEY) as target:
            async with connect(target, key=(user_key, cert)) as conn:
                result = await conn.run("echo certified")
            assert result.stdout == "certified\n"

    run(go)


def test_certificate_from_another_ca_is_refused() -> None:
    user_key = keygen()
    cert = keygen().generate_user_certificate(user_key, "id", valid_before=int(time.time()) + 3600)

    async def go() -> None:
        async with demo(trusted_ca=CA_KEY) as target:
            with pytest.raises(asyncssh.PermissionDenied):
                async with connect(target, key=(user_key, cert)):
                    pass

    run(go)


def test_port_forwarding_is_refused() -> None:
    async def go() -> None:
        async with session() as conn:
            with pytest.raises(asyncssh.ChannelOpenError):
                await conn.open_connection("127.0.0.1", 22)

    run(go)


def test_sftp_works(tmp_path: Path) -> None:
    (tmp_path / "hello.txt").write_bytes(b"hi")

    async def go() -> None:
        async with session() as conn, conn.start_sftp_client() as sftp:
            assert "hello.txt" in await sftp.listdir(str(tmp_path))
            async with sftp.open(str(tmp_path / "hello.txt"), "rb") as f:
                assert await f.read() == b"hi"

    run(go)


def test_stop_hangs_up_running_children() -> None:
    async def go() -> None:
        async with demo() as target, connect(target) as conn:
            proc = await conn.create_process("echo $$; exec sleep 30")
            pid = int(await proc.stdout.readline())
            await target.stop()
            await proc.wait()
            assert proc.exit_signal is not None
            assert proc.exit_signal[0] == "HUP"
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)

    run(go)
