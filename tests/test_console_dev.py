"""The console of ``bastion serve --dev`` (the README's first command): the local issuer's sign-in
page for demo identities, in headless Chromium, and what a browser may not get away with
(expired or foreign tokens in the cookie, a code without its PKCE verifier)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from tests.conftest import BASTION, GatewayProcess, free_port, wait_for
from tests.support import browser

ROOT = Path(__file__).resolve().parent.parent


class DevGateway(GatewayProcess):
    def _command(self) -> list[str]:
        return [*BASTION, "serve", "--dev", "--data-dir", str(self.data_dir),
                "--ssh-listen", f"127.0.0.1:{self.ssh_port}", "--http-listen", f"127.0.0.1:{self.http_port}",
                "--kube-listen", f"127.0.0.1:{free_port()}"]


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("console-dev")
    with DevGateway(data_dir / "no-config.toml", data_dir) as gw:
        yield gw


def _get(gw: GatewayProcess, path: str, cookie: str | None = None) -> tuple[int, str, dict[str, str]]:
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    req = urllib.request.Request(gw.http_url + path, headers={"Cookie": f"guarita_console={cookie}"} if cookie else {})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


def _post(url: str, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, urllib.parse.urlencode(form).encode(), timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _dev_token(gw: GatewayProcess, **body: Any) -> str:
    req = urllib.request.Request(gw.http_url + "/dev/token", json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return str(json.loads(resp.read())["token"])


@pytest.mark.skipif(browser.available() is not None, reason=str(browser.available()))
def test_dev_sign_in_page_and_roles(dev: GatewayProcess) -> None:
    # The welcome text says where the console is (printed once every front door is up).
    wait_for(lambda: f"{dev.http_url}/console/" in dev.log_text(), 30, "the console's address in the welcome text")
    with browser.Browser() as b:
        b.driver.get(dev.http_url + "/console/")
        b.wait(lambda: b.all("#as-alice"), what="the dev sign-in page")
        if os.environ.get("GUARITA_SCREENSHOTS"):
            b.driver.save_screenshot(str(ROOT / "docs" / "img" / "console-dev-sign-in.png"))
        b.css("#as-alice").click()
        b.wait_text("Nothing waits for a decision")  # an approver starts at the approvals
        assert "alice@example.com (approver, auditor, operator)" in b.text()
        cookie = next(c for c in b.driver.get_cookies() if c["name"] == "guarita_console")
        assert cookie["httpOnly"] and cookie["sameSite"] == "Lax" and not cookie["secure"]  # --dev: plain HTTP
        b.driver.get(dev.http_url + "/console/sessions")
        b.wait_text("No live sessions")
        b.css("header button.link").click()  # sign out
        b.wait_text("You are signed out")
        b.driver.get(dev.http_url + "/console/recordings")
        b.wait(lambda: b.all("#as-agent"), what="the sign-in page again")
        b.css("#as-agent").click()
        b.wait_text("Forbidden")
        assert "agents' identities have no console" in b.text()


def test_expired_and_foreign_tokens_send_the_browser_to_sign_in(dev: GatewayProcess) -> None:
    expired = _dev_token(dev, sub="alice", groups=["sre"], claims={"exp": int(time.time()) - 600})
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    foreign = jwt.encode({"iss": f"{dev.http_url}/dev", "aud": "guarita", "sub": "alice", "groups": ["sre"],
                          "exp": int(time.time()) + 600}, key, algorithm="RS256", headers={"kid": "not-ours"})
    for bad in (expired, foreign):
        status, _, headers = _get(dev, "/console/recordings?subject=alice", bad)
        assert status == 303, status
        location = urllib.parse.urlsplit(headers["Location"])
        assert location.path == "/console/login"
        assert urllib.parse.parse_qs(location.query) == {"next": ["/console/recordings?subject=alice"],
                                                         "expired": ["1"]}
        assert "guarita_console=" in headers["Set-Cookie"] and "Max-Age=0" in headers["Set-Cookie"]
        status, body, _ = _get(dev, "/console/events", bad)
        assert status == 401
    good = _dev_token(dev, sub="alice", groups=["sre"])
    status, body, _ = _get(dev, "/console/sessions", good)
    assert status == 200 and "Live sessions" in body
    events = dev.audit_events()
    assert any(e.get("event") == "auth.failure" and e.get("method") == "console" for e in events)


def test_dev_issuer_checks_client_redirect_and_pkce(dev: GatewayProcess) -> None:
    callback = f"{dev.http_url}/console/callback"
    verifier = "v" * 50
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
    good = {"client_id": "guarita-console", "redirect_uri": callback, "state": "s", "code_challenge": challenge,
            "code_challenge_method": "S256"}
    for bad in ({"client_id": "other"}, {"redirect_uri": "http://evil.example/console/callback"},
                {"code_challenge_method": "plain"}):
        status, body, _ = _get(dev, "/dev/authorize?" + urllib.parse.urlencode({**good, **bad}))
        assert status == 400 and "refused" in body.lower(), body

    def code() -> str:
        """The sign-in form's answer: a code bound to the challenge, sent to the redirect URI."""
        req = urllib.request.Request(dev.http_url + "/dev/authorize",
                                     urllib.parse.urlencode({**good, "sub": "alice", "groups": "sre"}).encode())

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any) -> None:
                return None

        try:
            urllib.request.build_opener(NoRedirect).open(req, timeout=10)
        except urllib.error.HTTPError as exc:
            location = exc.headers["Location"]
        assert location.startswith(callback + "?")
        return urllib.parse.parse_qs(urllib.parse.urlsplit(location).query)["code"][0]

    token_url = dev.http_url + "/dev/oauth/token"
    form = {"grant_type": "authorization_code", "client_id": "guarita-console", "redirect_uri": callback}
    first = code()
    status, body = _post(token_url, {**form, "code": first, "code_verifier": "w" * 50})
    assert status == 400 and body["error"] == "invalid_grant"
    status, body = _post(token_url, {**form, "code": first, "code_verifier": verifier})
    assert status == 400 and body["error"] == "invalid_grant", "a code must not survive a failed attempt"
    second = code()
    status, body = _post(token_url, {**form, "code": second, "code_verifier": verifier})
    assert status == 200 and body["token_type"] == "Bearer"
    assert jwt.decode(body["access_token"], options={"verify_signature": False})["sub"] == "alice"
    status, body = _post(token_url, {**form, "code": second, "code_verifier": verifier})
    assert status == 400, "a code is used once"
