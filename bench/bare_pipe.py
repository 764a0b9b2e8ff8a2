#!/usr/bin/env python3
"""A bare asyncssh pipe: the ceiling for a Python SSH gateway (no auth, no policy, no recording).

Accepts any password / keyboard-interactive answer, and relays each session channel to
one sshd over its own asyncssh client connection, with flow control both ways, exactly
the shape of guarita's front door minus everything guarita adds.

    bench/bare_pipe.py --port 2300 --target-port 2200 --key KEY [--upstream-cipher ALG]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import asyncssh

# Same server-side cipher preference as guarita's front door.
SERVER_ALGS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
               "aes128-ctr", "aes192-ctr", "aes256-ctr"]


class Front(asyncssh.SSHServer):
    def begin_auth(self, username: str) -> bool:
        return True

    def password_auth_supported(self) -> bool:
        return True

    def validate_password(self, username: str, password: str) -> bool:
        return True

    def kbdint_auth_supported(self) -> bool:
        return True

    def get_kbdint_challenge(self, username, lang, submethods):
        return "", "", "", [("Password: ", False)]

    def validate_kbdint_response(self, username, responses) -> bool:
        return True

    def session_requested(self) -> Relay:
        return Relay()


class Relay(asyncssh.SSHServerSession):
    def __init__(self) -> None:
        self.chan = self.up = self.conn = None
        self.cmd = self.term = None
        self.early: list[bytes] = []  # data and EOF can arrive before the upstream channel is open
        self.eof = False

    def connection_made(self, chan) -> None:
        self.chan = chan

    def pty_requested(self, term_type, term_size, term_modes) -> bool:
        self.term = (term_type, term_size, term_modes)
        return True

    def shell_requested(self) -> bool:
        return True

    def exec_requested(self, command: str) -> bool:
        self.cmd = command
        return True

    def session_started(self) -> None:
        self.chan.pause_reading()
        asyncio.create_task(self._open())

    async def _open(self) -> None:
        try:
            await self._connect()
        except (OSError, asyncssh.Error) as exc:
            print(f"bare_pipe: cannot reach the target: {exc!r}", file=sys.stderr, flush=True)
            self.chan.write_stderr(f"bare_pipe: {exc}\r\n".encode())
            self.chan.exit(255)

    async def _connect(self) -> None:
        algs = [ARGS.upstream_cipher] if ARGS.upstream_cipher else ()
        self.conn = await asyncssh.connect("127.0.0.1", ARGS.target_port, username=self.chan.get_extra_info("username"),
                                           client_keys=[ARGS.key], known_hosts=None, agent_path=None, config=None,
                                           encryption_algs=algs)
        kw = dict(term_type=self.term[0], term_size=self.term[1], term_modes=self.term[2]) if self.term else {}
        self.up, _ = await self.conn.create_session(lambda: Upstream(self), self.cmd, encoding=None, **kw)
        for data in self.early:
            self.up.write(data)
        if self.eof:
            self.up.write_eof()
        self.chan.resume_reading()

    def data_received(self, data: bytes, datatype) -> None:
        if self.up:
            self.up.write(data)
        else:
            self.early.append(data)

    def eof_received(self) -> bool:
        if self.up:
            self.up.write_eof()
        self.eof = True
        return True

    def terminal_size_changed(self, width, height, pixwidth, pixheight) -> None:
        if self.up:
            self.up.change_terminal_size(width, height, pixwidth, pixheight)

    def pause_writing(self) -> None:
        self.up.pause_reading()

    def resume_writing(self) -> None:
        self.up.resume_reading()

    def connection_lost(self, exc) -> None:
        if self.conn:
            self.conn.close()


class Upstream(asyncssh.SSHClientSession):
    def __init__(self, relay: Relay) -> None:
        self.relay, self.status = relay, None

    def data_received(self, data: bytes, datatype) -> None:
        if datatype == asyncssh.EXTENDED_DATA_STDERR:
            self.relay.chan.write_stderr(data)
        else:
            self.relay.chan.write(data)

    def exit_status_received(self, status: int) -> None:
        self.status = status

    def pause_writing(self) -> None:
        self.relay.chan.pause_reading()

    def resume_writing(self) -> None:
        self.relay.chan.resume_reading()

    def connection_lost(self, exc) -> None:
        self.relay.chan.exit(self.status if self.status is not None else 255)
        self.relay.conn.close()


async def main() -> None:
    server = await asyncssh.create_server(Front, "127.0.0.1", ARGS.port,
                                          server_host_keys=[asyncssh.generate_private_key("ssh-ed25519")],
                                          encryption_algs=SERVER_ALGS, encoding=None, line_editor=False,
                                          agent_forwarding=False, x11_forwarding=False)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True, help="listen on 127.0.0.1:PORT")
    p.add_argument("--target-port", type=int, required=True, help="sshd on 127.0.0.1:PORT")
    p.add_argument("--key", required=True, help="private key the pipe logs in to sshd with")
    p.add_argument("--upstream-cipher", default="", help="cipher of the pipe->sshd leg (default: asyncssh's choice)")
    ARGS = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="bare_pipe: %(name)s: %(message)s")
    asyncio.run(main())
