"""The web console end to end, as a person uses it: Debian's headless Chromium (Selenium)
signs in through the real Node oidc-provider (authorization code + PKCE, its dev login form),
real OpenSSH ``ssh`` sessions make approval requests and recordings, and a second gateway
replica on the same state database decides behind the page's back.

People (oidc-provider logins; their groups come from OIDC_USERS):
``ana`` approver (sre), operator (ops) and auditor (audit); ``robot`` an agent (group ci).
``agent-ci`` (client credentials, group ci) runs the ssh commands; ``agent-sre`` (group sre)
is the second approver, on the other replica.

``GUARITA_SCREENSHOTS=1`` writes the pages' pictures to docs/img/ (the README's and
docs/console.md's).
"""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import shutil
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    GatewayProcess,
    Targets,
    check_config,
    gateway_config,
    target_block,
    wait_for,
)
from tests.support import browser
from tests.support.approvals import BackgroundSsh, WebhookReceiver
from tests.support.oidc import OIDCProvider
from tests.support.openssh import free_port

pytestmark = pytest.mark.skipif(browser.available() is not None, reason=str(browser.available()))

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "docs" / "img"
CLIENT_ID = "guarita-console"
USERS = [
    {"sub": "ana", "groups": ["sre", "ops", "audit"], "email": "ana@example.com"},
    {"sub": "robot", "groups": ["ci"]},
]
CLIENTS = [
    {"client_id": "agent-ci", "client_secret": "ci-secret", "groups": ["ci"]},
    {"client_id": "agent-sre", "client_secret": "sre-secret", "groups": ["sre"], "email": "agent-sre@example.com"},
]
RULES = """
[[approvals]]
name = "destructive"
pattern = "needs-approval"
approvers = ["sre"]
timeout = "120s"
message = "commands that say needs-approval need a second person"

[roles.operators]
groups = ["ops"]

[roles.auditors]
groups = ["audit"]
"""


class FixedPortGateway(GatewayProcess):
    """A gateway whose HTTP port is chosen up front: the issuer must know the console's redirect URI."""

    def __init__(self, config_path: Path, data_dir: Path, http_port: int) -> None:
        super().__init__(config_path, data_dir)
        self.fixed_http = http_port

    def _pick_ports(self) -> None:
        self.ssh_port, self.http_port = free_port(), self.fixed_http


@pytest.fixture(scope="module")
def http_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def idp(http_port: int) -> Iterator[OIDCProvider]:
    web = [{"client_id": CLIENT_ID, "redirect_uris": [f"http://127.0.0.1:{http_port}/console/callback"]}]
    with OIDCProvider(clients=CLIENTS, users=USERS, token_ttl=600, web_clients=web) as provider:
        yield provider


@pytest.fixture(scope="module")
def hooks() -> Iterator[WebhookReceiver]:
    with WebhookReceiver() as receiver:
        yield receiver


def _config(data_dir: Path, idp: OIDCProvider, targets: Targets, hooks: WebhookReceiver, http_port: int,
            state: str = "") -> str:
    target = target_block("web-key", targets.web_key.port, [targets.login], [targets.web_key.host_key_line], "key",
                          targets.gateway_key)
    access = '[[access]]\nname = "everyone"\nsubjects = ["*"]\ntargets = ["*"]\n'
    console = (f'[console]\nclient_id = "{CLIENT_ID}"\nurl = "http://127.0.0.1:{http_port}"\n\n'
               f'[[webhooks]]\nurl = "{hooks.url}/json"\n\n')
    state_text = f'[state]\nurl = "{state}"\n' if state else ""
    return gateway_config(data_dir, [(idp.issuer, "5s")], target, access + RULES + console + state_text)  # type: ignore[list-item]


@pytest.fixture(scope="module")
def cgw(idp: OIDCProvider, targets: Targets, hooks: WebhookReceiver, http_port: int,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    data_dir = tmp_path_factory.mktemp("console-gw")
    path = data_dir / "guarita.toml"
    path.write_text(_config(data_dir, idp, targets, hooks, http_port))
    checked = check_config(path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    with FixedPortGateway(path, data_dir, http_port) as gw:
        yield gw


@pytest.fixture(scope="module")
def replica(cgw: GatewayProcess, idp: OIDCProvider, targets: Targets, hooks: WebhookReceiver,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A second replica on the same state database (its own port, its own data folder)."""
    data_dir = tmp_path_factory.mktemp("console-replica")
    path = data_dir / "guarita.toml"
    path.write_text(_config(data_dir, idp, targets, hooks, cgw.http_port,
                            state=f"sqlite:///{cgw.data_dir / 'state.db'}"))
    with GatewayProcess(path, data_dir) as gw:
        yield gw


@pytest.fixture(scope="module")
def chrome() -> Iterator[browser.Browser]:
    with browser.Browser() as b:
        yield b


def sign_in(b: browser.Browser, gw: GatewayProcess, login: str, page: str = "/console/approvals") -> None:
    """Through the issuer's own login form (oidc-provider dev interactions): login, then consent."""
    b.driver.delete_all_cookies()
    b.driver.get(gw.http_url + page)
    b.wait(lambda: b.all("input[name=login]"), what="the issuer's login form")
    b.css("input[name=login]").send_keys(login)
    b.css("input[name=password]").send_keys("any")
    b.css("button[type=submit]").click()
    b.wait(lambda: b.driver.current_url.startswith(gw.http_url) or b.all("button[autofocus]"), what="consent")
    if not b.driver.current_url.startswith(gw.http_url):
        b.css("button[autofocus]").click()  # the consent page's Continue
    b.wait(lambda: any(c["name"] == "__Host-guarita_console" for c in b.driver.get_cookies())
           and not b.driver.current_url.startswith(gw.http_url + "/console/callback"), what="back on the console")


def shoot(b: browser.Browser, name: str) -> None:
    if os.environ.get("GUARITA_SCREENSHOTS"):
        SHOTS.mkdir(parents=True, exist_ok=True)
        b.driver.save_screenshot(str(SHOTS / name))


def cookie_of(b: browser.Browser) -> str:
    return next(c["value"] for c in b.driver.get_cookies() if c["name"] == "__Host-guarita_console")


def http(gw: GatewayProcess, path: str, cookie: str | None = None, form: dict[str, str] | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, str, dict[str, str]]:
    """One request without following redirects: (status, body, headers)."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any) -> None:
            return None

    req = urllib.request.Request(gw.http_url + path, data=urllib.parse.urlencode(form).encode() if form else None,
                                 headers={**({"Cookie": f"__Host-guarita_console={cookie}"} if cookie else {}),
                                          **(headers or {})})
    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=30) as resp:
            return resp.status, resp.read().decode(errors="replace"), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace"), dict(exc.headers)


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([0-9a-f]+)"', html)
    assert found, html[:2000]
    return found.group(1)


def ssh_args(gw: GatewayProcess, targets: Targets, command: str) -> list[str]:
    return ["-p", str(gw.ssh_port), f"{targets.login}@web-key@127.0.0.1", command]


def requested(gw: GatewayProcess, mark: int, command: str) -> str:
    return str(gw.wait_audit("approval.requested", mark, timeout=20, command=command)["request"])


# ---------------------------------------------------------------------------


def test_an_agent_identity_gets_403_on_every_page(cgw: GatewayProcess, chrome: browser.Browser) -> None:
    sign_in(chrome, cgw, "robot")
    for path in ("/console/approvals", "/console/sessions", "/console/recordings", "/console/evidence",
                 "/console/approvals/nosuchid", "/console/sessions/x/watch", "/console/recordings/x"):
        status, body, _ = http(cgw, path, cookie_of(chrome))
        assert status == 403, (path, status, body[:300])
        assert "robot" in body and "agents" in body
    chrome.driver.get(cgw.http_url + "/console/recordings")
    chrome.wait_text("Forbidden")
    assert "no console" in chrome.text()


def test_an_approver_sees_approvals_and_the_sessions_they_decide_on_only(cgw: GatewayProcess, idp: OIDCProvider,
                                                                        targets: Targets) -> None:
    approver = idp.token("agent-sre")  # group sre: an approver, neither operator nor auditor
    command = "echo needs-approval-roles"
    mark = cgw.audit_mark()
    job = BackgroundSsh(ssh_args(cgw, targets, command), idp.token("agent-ci"))
    rid = requested(cgw, mark, command)
    sid = str(cgw.wait_audit("session.start", mark, command=command)["session"])
    status, html, _ = http(cgw, "/console/approvals", approver)
    assert status == 200 and rid in html and "button" in html.split(f'id="req-{rid}"')[1].split("</article>")[0]
    assert http(cgw, f"/console/sessions/{sid}/watch", approver)[0] == 200  # a pending request of that session
    for path in ("/console/sessions", "/console/recordings", "/console/evidence", f"/console/recordings/{sid}"):
        assert http(cgw, path, approver)[0] == 403, path
    status, _, headers = http(cgw, f"/console/approvals/{rid}/decide", approver,
                              {"csrf": csrf_of(html), "decision": "approve", "reason": "fine", "back": "/console/approvals"})
    assert status == 303 and headers["Location"] == "/console/approvals"
    assert job.join().returncode == 0
    assert http(cgw, f"/console/sessions/{sid}/watch", approver)[0] == 403  # decided: nothing left to watch for


def test_without_a_console_table_sign_in_says_what_to_configure(gateway: GatewayProcess) -> None:
    status, body, _ = http(gateway, "/console/login")
    assert status == 503 and "[console]" in body and "client_id" in body


def test_approve_a_real_ssh_request_in_the_browser(cgw: GatewayProcess, chrome: browser.Browser, idp: OIDCProvider,
                                                   targets: Targets, hooks: WebhookReceiver) -> None:
    sign_in(chrome, cgw, "ana")
    chrome.wait_text("Nothing waits for a decision")
    cookies = {c["name"]: c for c in chrome.driver.get_cookies()}
    session = cookies["__Host-guarita_console"]
    assert session["httpOnly"] and session["secure"] and session["sameSite"] == "Lax", session
    # Marks this very page: a reload would lose it.
    chrome.driver.execute_script("window.notReloaded = true")

    command = "echo needs-approval-$((6*7)); echo console-done"
    mark = cgw.audit_mark()
    job = BackgroundSsh(ssh_args(cgw, targets, command), idp.token("agent-ci"))
    rid = requested(cgw, mark, command)
    seen = time.monotonic()
    chrome.wait(lambda: chrome.all(f"#req-{rid} button.approve"), timeout=5, what="the request on the page")
    print(f"\nconsole: request {rid} on the page {time.monotonic() - seen:.2f}s after its audit line")  # not asserted
    assert chrome.driver.execute_script("return window.notReloaded === true"), "the page was reloaded"
    card = chrome.wait(lambda: chrome.css(f"#req-{rid}").text, what="the card's text")
    for fact in (command, "agent-ci", f"{targets.login}@web-key", "destructive", "sre", "ago", "in "):
        assert fact in card, (fact, card)
    shoot(chrome, "console-approvals.png")
    # An approver paged at night decides on a phone: the page fits a narrow screen.
    chrome.driver.set_window_size(412, 915)
    try:
        chrome.wait(lambda: chrome.driver.execute_script(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1"), timeout=5,
            what="the page to fit a phone's width")
        shoot(chrome, "console-approvals-phone.png")
    finally:
        chrome.driver.set_window_size(1280, 900)

    # The webhook links straight to this request's page.
    _, body = hooks.wait(lambda path, b: b["event"] == "approval.requested" and b["request"]["id"] == rid)
    assert body["url"] == f"{cgw.http_url}/console/approvals/{rid}"
    chrome.driver.get(body["url"])
    chrome.wait(lambda: chrome.all(f"#req-{rid} input[name=reason]"), what="the request's own page")
    chrome.act(f"#req-{rid} input[name=reason]", lambda el: el.send_keys("ticket OPS-7"))
    chrome.act(f"#req-{rid} button.approve", lambda el: el.click())

    result = job.join()
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"needs-approval-42\nconsole-done\n"
    assert "approved by ana" in result.stderr.decode()
    chrome.wait(lambda: chrome.all(f"article.request.approved#req-{rid}"), what="the request shown approved")
    assert "ticket OPS-7" in chrome.text()
    chrome.driver.get(cgw.http_url + "/console/approvals")
    decided = chrome.css("#decided").text
    assert rid in decided and "ana@example.com" in decided and "ticket OPS-7" in decided
    cgw.wait_audit("approval.decision", mark, request=rid, approver="ana", decision="approve")


def test_no_approve_button_on_ones_own_request(cgw: GatewayProcess, chrome: browser.Browser, idp: OIDCProvider,
                                               targets: Targets) -> None:
    sign_in(chrome, cgw, "ana")
    own_token = cookie_of(chrome)  # ana's own access token, from the same issuer: she runs the command
    command = "echo needs-approval-own"
    mark = cgw.audit_mark()
    job = BackgroundSsh(ssh_args(cgw, targets, command), own_token)
    rid = requested(cgw, mark, command)
    chrome.wait(lambda: chrome.all(f"#req-{rid}"), timeout=5, what="her own request")
    card = chrome.wait(lambda: chrome.css(f"#req-{rid}").get_attribute("innerHTML"), what="the card")
    assert "Your own request" in card and "button" not in card.split("</dl>")[-1], card
    # Forged by hand, the decision is still refused by the engine.
    status, html, _ = http(cgw, "/console/approvals", own_token)
    status, body, _ = http(cgw, f"/console/approvals/{rid}/decide", own_token,
                           {"csrf": csrf_of(html), "decision": "approve", "reason": "mine"},
                           {"Origin": cgw.http_url})
    assert status == 403 and "own request" in body
    other = idp.token("agent-sre")  # a bearer token works as a console cookie too: one identity model
    status, body, _ = http(cgw, f"/console/approvals/{rid}/decide", other,
                           {"csrf": csrf_of(http(cgw, "/console/approvals", other)[1]),
                            "decision": "deny", "reason": "not today"})
    assert status == 303, body
    assert job.join().returncode != 0


def test_decided_on_another_replica_updates_the_page(cgw: GatewayProcess, replica: GatewayProcess,
                                                     chrome: browser.Browser, idp: OIDCProvider,
                                                     targets: Targets) -> None:
    sign_in(chrome, cgw, "ana")
    command = "echo needs-approval-elsewhere"
    mark = cgw.audit_mark()
    job = BackgroundSsh(ssh_args(cgw, targets, command), idp.token("agent-ci"))
    rid = requested(cgw, mark, command)
    chrome.wait(lambda: chrome.all(f"#req-{rid} button.deny"), timeout=5, what="the pending request")
    chrome.driver.execute_script("window.notReloaded = true")
    # agent-sre denies through the other replica's API (the same state database).
    req = urllib.request.Request(f"{replica.http_url}/v1/approvals/{rid}/deny", method="POST",
                                 data=json.dumps({"reason": "decided elsewhere"}).encode(),
                                 headers={"Authorization": f"Bearer {idp.token('agent-sre')}",
                                          "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    chrome.wait(lambda: not chrome.all(f"#req-{rid} button.deny") and rid in chrome.css("#decided").text,
                timeout=5, what="the page to show the decision")
    assert "decided elsewhere" in chrome.css("#decided").text
    assert chrome.driver.execute_script("return window.notReloaded === true")
    assert job.join().returncode != 0
    # Deciding again (a stale form, a second click): refused with the reason, nothing changes.
    token = cookie_of(chrome)
    status, html, _ = http(cgw, "/console/approvals", token)
    status, body, _ = http(cgw, f"/console/approvals/{rid}/decide", token,
                           {"csrf": csrf_of(html), "decision": "approve", "reason": "too late"})
    assert status == 409 and "already denied" in body


def test_bad_cookies_and_missing_csrf(cgw: GatewayProcess, chrome: browser.Browser) -> None:
    sign_in(chrome, cgw, "ana")
    token = cookie_of(chrome)
    # A forged cookie (one signature byte changed) and garbage: sign in again, the cookie is cleared.
    forged = token[:-3] + ("A" if token[-3] != "A" else "B") + token[-2:]
    for bad in (forged, "not-a-token"):
        status, _, headers = http(cgw, "/console/approvals", bad)
        assert status == 303 and headers["Location"].startswith("/console/login?")
        assert "Max-Age=0" in headers.get("Set-Cookie", ""), headers
        status, body, _ = http(cgw, "/console/approvals/x/decide", bad, {"decision": "approve", "reason": "r"})
        assert status == 401
    # No CSRF token, a wrong one, or another site's Origin: refused before anything is decided.
    for form, extra in (({"decision": "approve", "reason": "r"}, {}),
                        ({"decision": "approve", "reason": "r", "csrf": "0" * 40}, {}),
                        ({"decision": "approve", "reason": "r", "csrf": csrf_of(http(cgw, "/console/approvals",
                                                                                     token)[1])},
                         {"Origin": "https://evil.example"})):
        status, body, _ = http(cgw, "/console/approvals/x/decide", token, form, extra)
        assert status == 403 and "CSRF" in body, body[:300]
    # A callback the browser did not start, a replayed state, or the issuer's refusal: no session.
    status, body, headers = http(cgw, "/console/callback?code=x&state=y")
    assert status == 400 and "not started here" in body and "Set-Cookie" not in headers
    status, body, _ = http(cgw, "/console/callback?error=access_denied&error_description=no")
    assert status == 400 and "refused the sign-in: access_denied" in body
    # Sign out: the cookie goes, and the pages ask to sign in again.
    chrome.driver.get(cgw.http_url + "/console/approvals")
    chrome.css("header button.link").click()
    chrome.wait_text("You are signed out")
    assert not [c for c in chrome.driver.get_cookies() if c["name"] == "__Host-guarita_console"]


def test_play_a_recording_seek_to_a_marker_search_and_download(cgw: GatewayProcess, chrome: browser.Browser,
                                                               idp: OIDCProvider, targets: Targets) -> None:
    mark = cgw.audit_mark()
    command = "printf 'first-screen\\n'; sleep 1; printf 'second-screen\\n'"
    job = BackgroundSsh(["-tt", *ssh_args(cgw, targets, command)], idp.token("agent-ci"))
    assert job.join().returncode == 0
    sid = str(cgw.wait_audit("session.start", mark, command=command)["session"])
    wait_for(lambda: sid in cgw.recordings(), 15, "the sealed recording")

    sign_in(chrome, cgw, "ana", "/console/recordings?subject=agent-ci&command=second-screen")
    chrome.wait(lambda: chrome.all(f"input[value='{sid}']"), what="the recording in the list")
    row = chrome.css(f"input[value='{sid}']").find_element("xpath", "./ancestor::tr").text
    assert "verified" in row and "agent-ci" in row, row
    chrome.driver.get(f"{cgw.http_url}/console/recordings/{sid}")
    chrome.wait(lambda: chrome.all(".ap-term-text"), what="the player")
    assert "Verified" in chrome.css(".verify").text
    markers = chrome.all("li.marker.exit button.seek")
    assert markers, chrome.text()
    markers[0].click()
    chrome.wait(lambda: "second-screen" in chrome.css(".ap-term-text").text, what="the screen at the exit marker")
    assert "first-screen" in chrome.css(".ap-term-text").text
    # The player's own timeline carries the markers.
    assert chrome.all(".ap-marker-container")
    chrome.driver.execute_script("window.scrollTo(0, 0)")
    shoot(chrome, "console-recording.png")
    # Another speed: the player starts again from where it was, at that speed.
    before = chrome.driver.execute_script("return window.guaritaPlayer")
    chrome.driver.execute_script("var s = document.getElementById('speed'); s.value = '4';"
                                 "s.dispatchEvent(new Event('change'))")
    chrome.wait(lambda: chrome.driver.execute_script("return window.guaritaPlayer") != before, what="a new player")
    chrome.wait(lambda: "second-screen" in chrome.css(".ap-term-text").text, what="the screen after the change")

    # Search (the engine of `replay search`), then jump to the hit.
    chrome.driver.get(f"{cgw.http_url}/console/recordings?q=first-scr")
    chrome.wait(lambda: chrome.all("a.hit.output"), what="a search hit in the output")
    chrome.all("a.hit.output")[0].click()
    chrome.wait(lambda: chrome.all(".ap-term-text") and "first-screen" in chrome.css(".ap-term-text").text,
                what="the player at the hit")

    status, cast, headers = http(cgw, f"/console/recordings/{sid}/cast?download=1", cookie_of(chrome))
    assert status == 200 and headers["Guarita-Verification"] == "verified"
    assert f'filename="{sid}.cast"' in headers["Content-Disposition"]
    header = json.loads(cast.splitlines()[0])
    assert header["version"] == 2 and any("second-screen" in line for line in cast.splitlines()[1:])

    # Evidence: the same package as `replay evidence`, for a selection.
    token = cookie_of(chrome)
    status, html, _ = http(cgw, "/console/evidence", token)
    req = urllib.request.Request(cgw.http_url + "/console/evidence", data=urllib.parse.urlencode(
        {"csrf": csrf_of(html), "subject": "agent-ci", "id": sid}).encode(),
        headers={"Cookie": f"__Host-guarita_console={token}"})
    with urllib.request.urlopen(req, timeout=60) as resp:
        package = resp.read()
        assert "attachment" in resp.headers["Content-Disposition"]
    with tarfile.open(fileobj=io.BytesIO(package), mode="r:gz") as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        names = tar.getnames()
    assert [row["id"] for row in index] == [sid] and index[0]["verified"] is True
    assert f"sessions/{sid}/session.cast" in names and "README.txt" in names
    assert gzip.decompress(package)  # a real gzip stream


def test_a_recording_that_fails_verification_is_never_played_as_fine(cgw: GatewayProcess,
                                                                      chrome: browser.Browser,
                                                                      idp: OIDCProvider, targets: Targets) -> None:
    mark = cgw.audit_mark()
    command = "echo tamper-me"
    assert BackgroundSsh(ssh_args(cgw, targets, command), idp.token("agent-ci")).join().returncode == 0
    sid = str(cgw.wait_audit("session.start", mark, command=command)["session"])
    wait_for(lambda: sid in cgw.recordings(), 15, "the sealed recording")
    segment = sorted(cgw.recordings_dir.glob(f"*/*/*/{sid}/seg-*.zst"))[0]
    data = bytearray(segment.read_bytes())
    data[-5] ^= 0xFF  # the local folder store is not write-once: an edit an auditor must see
    segment.write_bytes(bytes(data))

    sign_in(chrome, cgw, "ana", f"/console/recordings/{sid}")
    chrome.wait_text("FAILED verification")
    assert not chrome.all(".ap-term-text"), "a failed recording must not start playing"
    chrome.css("#play-unverified").click()
    chrome.wait(lambda: chrome.all("#player.unverified .ap-wrapper"), what="the player, framed as unverified")
    chrome.driver.get(f"{cgw.http_url}/console/recordings?command=tamper-me")
    chrome.wait(lambda: chrome.all(".verify.failed"), what="failed in the list")
    status, _, headers = http(cgw, f"/console/recordings/{sid}/cast?download=1", cookie_of(chrome))
    # Unreadable here (the damaged segment does not decompress): refused, and never labelled fine.
    assert status == 422 and headers.get("Guarita-Verification") == "failed", (status, headers)
    shutil.rmtree(segment.parent)  # leave no broken recording for the other tests' lists


def test_watch_and_kill_a_live_session(cgw: GatewayProcess, chrome: browser.Browser, idp: OIDCProvider,
                                       targets: Targets) -> None:
    mark = cgw.audit_mark()
    command = "for i in $(seq 1 120); do echo live-tick-$i; sleep 0.5; done"
    job = BackgroundSsh(["-tt", *ssh_args(cgw, targets, command)], idp.token("agent-ci"), timeout=90)
    sid = str(cgw.wait_audit("session.start", mark, command=command)["session"])
    sign_in(chrome, cgw, "ana", "/console/sessions")
    chrome.wait(lambda: sid in chrome.text(), timeout=10, what="the live session")
    row = chrome.wait(lambda: chrome.css(f"form.kill[action='/console/sessions/{sid}/kill']")
                      .find_element("xpath", "./ancestor::tr").text, what="the session's row")
    assert "agent-ci" in row and "web-key" in row and "in /" in row, row
    shoot(chrome, "console-sessions.png")

    chrome.driver.get(f"{cgw.http_url}/console/sessions/{sid}/watch")
    chrome.wait(lambda: chrome.all(".ap-term-text") and "live-tick" in chrome.css(".ap-term-text").text,
                timeout=20, what="the session's output, live")

    # Its recording, not sealed yet, is "live", never "verified", and links to the live view.
    chrome.driver.get(f"{cgw.http_url}/console/recordings/{sid}")
    chrome.wait_text("Not sealed yet")
    assert chrome.css("p.verify.live a").get_attribute("href").endswith(f"/console/sessions/{sid}/watch")

    chrome.driver.get(cgw.http_url + "/console/sessions")
    form = f"form.kill[action='/console/sessions/{sid}/kill']"
    chrome.wait(lambda: chrome.all(form), what="the kill form")
    chrome.act(f"{form} input[name=reason]", lambda el: el.send_keys("runaway loop"))
    chrome.act(f"{form} button", lambda el: el.click())
    result = job.join(60)
    assert result.returncode != 0
    assert b"runaway loop" in result.stdout + result.stderr
    chrome.wait(lambda: sid not in chrome.text(), timeout=10, what="the session to leave the list")


def test_lock_the_subject_of_a_live_session(cgw: GatewayProcess, chrome: browser.Browser, idp: OIDCProvider,
                                            targets: Targets) -> None:
    mark = cgw.audit_mark()
    command = "for i in $(seq 1 120); do echo lock-tick-$i; sleep 0.5; done"
    job = BackgroundSsh(["-tt", *ssh_args(cgw, targets, command)], idp.token("agent-ci"), timeout=90)
    sid = str(cgw.wait_audit("session.start", mark, command=command)["session"])
    sign_in(chrome, cgw, "ana", "/console/sessions")
    form = f"form.lock[action='/console/sessions/{sid}/lock']"
    chrome.wait(lambda: chrome.all(form), timeout=10, what="the lock form")
    chrome.act(f"{form} input[name=reason]", lambda el: el.send_keys("leaked token"))
    chrome.act(f"{form} button", lambda el: el.click())
    result = job.join(60)
    assert result.returncode != 0 and b"leaked token" in result.stdout + result.stderr
    # Locked: the next connection is refused. Lifted again through the API, with the same identity.
    token = cookie_of(chrome)
    req = urllib.request.Request(cgw.http_url + "/v1/locks", headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        locks = [lk for lk in json.loads(resp.read())["locks"] if lk["value"] == "agent-ci"]
    assert locks and locks[0]["reason"] == "leaked token"
    refused = BackgroundSsh(ssh_args(cgw, targets, "echo nope"), idp.token("agent-ci")).join()
    assert refused.returncode == 255 and b"nope" not in refused.stdout
    for lock in locks:
        req = urllib.request.Request(f"{cgw.http_url}/v1/locks/{lock['id']}", method="DELETE",
                                     headers={"Authorization": f"Bearer {token}"})
        urllib.request.urlopen(req, timeout=10).close()
