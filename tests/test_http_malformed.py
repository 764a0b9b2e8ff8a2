"""Malformed requests on the HTTP API: an oversized header, a NUL in a header, ``GET *``, a
path with invalid characters, a path no route has. Each gets a JSON error, an audit event,
and no traceback in the gateway log (a real ``bastion serve --dev``, raw sockets).

The Kubernetes front door's side (a Kubernetes Status) is in tests/test_kube_e2e.py, through
:func:`raw_exchange` and :data:`MALFORMED`.
"""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BASTION, free_port, wait_for

# name -> (raw request, expected status)
MALFORMED: dict[str, tuple[bytes, int]] = {
    "oversized-header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 400),
    "nul-in-header": (b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n", 400),
    "get-star": (b"GET * HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "invalid-path-bytes": (b"GET /v1/\xff\x00/../x HTTP/1.1\r\nHost: x\r\n\r\n", 400),
    "garbage-request-line": (b"\x16\x03\x01\x02\x00garbage\r\n\r\n", 400),
}


def raw_exchange(port: int, request: bytes, context: ssl.SSLContext | None = None) -> tuple[int, str, bytes]:
    """Send ``request`` as is; (status, content type, body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as plain:
        sock = context.wrap_socket(plain, server_hostname="127.0.0.1") if context else plain
        sock.sendall(request)
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except (OSError, ssl.SSLError):
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1]) if lines and lines[0].startswith("HTTP/") else 0
    ctype = next((line.split(":", 1)[1].strip() for line in lines[1:] if line.lower().startswith("content-type:")),
                 "")
    return status, ctype, body


@pytest.fixture
def dev_gateway(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    http = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([*BASTION, "serve", "--dev", "--data-dir", str(tmp_path / "d"), "--log-format", "json",
                                 "--ssh-listen", f"127.0.0.1:{free_port()}", "--http-listen", f"127.0.0.1:{http}",
                                 "--kube-listen", f"127.0.0.1:{free_port()}"],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True)

    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            return proc.poll() is not None

    try:
        wait_for(healthy, 30, "serve --dev")
        assert proc.poll() is None, log.read_text()
        yield http, tmp_path
    finally:
        proc.terminate()
        proc.wait(30)


def _audit(tmp_path: Path) -> list[dict]:
    path = tmp_path / "d" / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def test_malformed_requests_on_the_http_api(dev_gateway: tuple[int, Path]) -> None:
    port, tmp_path = dev_gateway
    for name, (request, expected) in MALFORMED.items():
        status, ctype, body = raw_exchange(port, request)
        assert status == expected, (name, status, body[:200])
        assert ctype.startswith("application/json"), (name, ctype, body[:200])
        answer = json.loads(body)
        assert answer["error"] == "bad_request" and answer["message"] and len(answer["message"]) <= 200, answer
    # Paths that parse but name nothing: JSON too, and audited.
    for path in (b"//v1/whoami", b"/v1/sessions/%00", b"/%2e%2e/etc/passwd"):
        status, ctype, body = raw_exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status == 404 and ctype.startswith("application/json"), (path, status, body[:200])
        assert json.loads(body)["error"] == "not_found"
    status, _, body = raw_exchange(port, b"DELETE /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 405 and json.loads(body)["error"] == "method_not_allowed"
    # Still serving.
    status, _, body = raw_exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status == 200, body

    def audited() -> list[dict]:
        return [e for e in _audit(tmp_path) if e.get("event") == "http.bad_request"]

    events = wait_for(lambda: len(audited()) >= len(MALFORMED) + 4 and audited(), 10, "the audit events")
    assert {e["status"] for e in events} == {400, 404, 405} and all(e["front_door"] == "api" for e in events)
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log and "aiohttp.server" not in log, log[-3000:]
    for line in log.splitlines():
        json.loads(line)  # one JSON object per line, the refusals included
