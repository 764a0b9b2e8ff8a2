"""The console's pieces that need no browser: [console] parsing, redirects, CSRF, links, HTML escaping."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.config import ConfigError, parse_config
from bastion.console.auth import csrf_for, safe_next
from bastion.console.render import digest, e
from bastion.console.settings import DEV_CLIENT_ID, console_settings, parse_console, request_link

ISSUERS = ("https://id.example",)


def test_console_table_is_checked_key_by_key() -> None:
    settings, problems = parse_console({"client_id": "web", "url": "https://bastion.example/"}, ISSUERS)
    assert problems == [] and settings is not None
    assert (settings.client_id, settings.url, settings.issuer) == ("web", "https://bastion.example", None)
    _, problems = parse_console({"issuer": "https://other.example", "url": "ftp://x", "scopes": ["email"],
                                 "colour": "red"}, ISSUERS)
    keys = sorted(k for k, _ in problems)
    assert keys == ["console.client_id", "console.colour", "console.issuer", "console.scopes", "console.url"]
    assert parse_console(None, ISSUERS) == (None, [])


def test_config_file_names_the_console_problem(tmp_path: Path) -> None:
    raw = {"oidc": [{"issuer": "https://id.example", "audience": "guarita"}], "console": {"client_id": ""}}
    with pytest.raises(ConfigError) as err:
        parse_config(raw, tmp_path)
    assert "console.client_id" in str(err.value)
    raw["console"] = {"client_id": "guarita-web", "url": "https://bastion.example"}
    config = parse_config(raw, tmp_path)
    assert console_settings(config).client_id == "guarita-web"  # type: ignore[union-attr]
    assert request_link(config, "abc") == "https://bastion.example/console/approvals/abc"
    del raw["console"]
    off = parse_config(raw, tmp_path)
    assert console_settings(off) is None and request_link(off, "abc") is None


def test_dev_has_a_console_without_configuration(tmp_path: Path) -> None:
    from bastion.devmode import dev_config

    config = dev_config(tmp_path, http_port=18080)
    assert console_settings(config).client_id == DEV_CLIENT_ID  # type: ignore[union-attr]
    assert request_link(config, "r1") == "http://127.0.0.1:18080/console/approvals/r1"


@pytest.mark.parametrize("value", [None, "", "https://evil.example/", "//evil.example/console/", "/v1/approvals",
                                   "/console\\..\\x", "javascript:alert(1)"])
def test_sign_in_only_returns_to_console_pages(value: str | None) -> None:
    assert safe_next(value) == "/console/"


def test_csrf_token_is_bound_to_the_session_token() -> None:
    assert csrf_for("a.b.c") == csrf_for("a.b.c") != csrf_for("a.b.d")
    assert len(csrf_for("x")) == 40


def test_html_is_escaped_and_relative_times_do_not_change_the_digest() -> None:
    assert e('<script>"&') == "&lt;script&gt;&quot;&amp;"
    one = '<td><span class="rel" data-age="1">3s ago</span></td>'
    assert digest(one) == digest(one.replace("3s", "9s")) != digest(one.replace("<td>", "<td>x"))


def test_the_delegation_chain_is_shown_as_the_identity_names_it() -> None:
    from bastion.console.approvals_page import delegation

    request = {"requester": {"subject": "alice", "act": [{"sub": "subagent"}, {"sub": "claude"}]}}
    assert "via claude via subagent" in delegation(request)
    assert delegation({"requester": {"subject": "alice"}}) == ""
    assert "&lt;b&gt;" in delegation({"requester": {"act": [{"sub": "<b>"}]}})


def test_the_vendored_player_is_the_pinned_one() -> None:
    """static/ holds the pinned asciinema-player (and its licence); when the npm package is installed
    (.ci/install-deps), the committed copy must be byte for byte the pinned build."""
    import json

    console = Path(__file__).resolve().parent.parent / "bastion" / "console"
    pinned = json.loads((console / "vendor" / "package.json").read_text())["dependencies"]["asciinema-player"]
    static = console / "static"
    assert f"asciinema-player {pinned} (Apache-2.0)" in (static / "VERSIONS").read_text()
    assert "Apache License" in (static / "asciinema-player.LICENSE").read_text()
    assert "MIT" in (static / "solid-js.LICENSE").read_text() or "Permission is hereby granted" in (
        static / "solid-js.LICENSE").read_text()
    built = console / "vendor" / "node_modules" / "asciinema-player" / "dist" / "bundle"
    if not built.is_dir():
        pytest.skip("bastion/console/vendor/node_modules is not installed (.ci/install-deps installs it)")
    for name in ("asciinema-player.min.js", "asciinema-player.css"):
        assert (static / name).read_bytes() == (built / name).read_bytes(), f"run bastion/console/vendor/update.sh ({name})"


def test_origin_is_this_gateway_or_its_public_url() -> None:
    from aiohttp.test_utils import make_mocked_request

    from bastion.console.auth import same_origin

    def req(origin: str | None) -> object:
        headers = {"Host": "10.0.0.5:8080", **({"Origin": origin} if origin else {})}
        return make_mocked_request("POST", "/console/logout", headers=headers)

    assert same_origin(req(None)) and same_origin(req("http://10.0.0.5:8080"))  # type: ignore[arg-type]
    assert not same_origin(req("https://evil.example"))  # type: ignore[arg-type]
    assert not same_origin(req("null"))  # type: ignore[arg-type]
    assert same_origin(req("https://bastion.example.com"), "https://bastion.example.com")  # type: ignore[arg-type]
