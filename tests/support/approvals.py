"""Helpers for the approval tests: a webhook receiver, the real ``bastion approvals`` CLI,
and an exec that runs in a thread while the test acts as the approver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tests.support.openssh import run_ssh

BASTION = [sys.executable, "-m", "bastion.cli"]


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 that keeps every JSON body POSTed to it, by path."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, Any]]] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with receiver._cond:
                    receiver.received.append((self.path, json.loads(body or b"{}")))
                    receiver._cond.notify_all()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> WebhookReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def wait(self, predicate: Any, timeout: float = 10.0) -> tuple[str, dict[str, Any]]:
        """The first (path, body) matching ``predicate``, waiting for it to arrive."""
        with self._cond:
            found = self._cond.wait_for(lambda: next((r for r in self.received if predicate(*r)), None), timeout)
        if not found:
            raise AssertionError(f"no matching webhook within {timeout}s; got {self.received}")
        return found


def cli(args: Sequence[str], token: str | None, gateway_url: str,
        timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """The real ``bastion`` CLI with ``token`` in $GUARITA_TOKEN and ``--gateway``."""
    env = {k: v for k, v in os.environ.items() if k not in ("GUARITA_TOKEN", "GUARITA_TOKEN_FILE", "GUARITA_URL")}
    if token is not None:
        env["GUARITA_TOKEN"] = token
    return subprocess.run([*BASTION, *args, "--gateway", gateway_url], capture_output=True, text=True,
                          env=env, timeout=timeout)


class BackgroundSsh:
    """``run_ssh`` in a thread: the command waits for approval while the test decides."""

    def __init__(self, args: Sequence[str], token: str, timeout: float = 60, **kw: Any) -> None:
        self.result: subprocess.CompletedProcess[bytes] | None = None
        self.error: BaseException | None = None

        def run() -> None:
            try:
                self.result = run_ssh(list(args), token=token, timeout=timeout, **kw)
            except BaseException as exc:  # reported by join()
                self.error = exc

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("ssh still running")
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result
