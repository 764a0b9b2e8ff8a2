"""The delegation chain (RFC 8693 ``act``): verification, rules that match on it, approvers.

Unit tests with a local issuer; the real oidc-provider's token exchange is exercised end to
end in tests/test_mcp_e2e.py (SSH, Kubernetes and MCP sessions opened with nested tokens).
"""

from __future__ import annotations

import asyncio
import time
import tomllib
from pathlib import Path
from typing import Any

import jwt
import pytest

from bastion.config import AccessRule, IssuerConfig, TargetConfig, parse_config
from bastion.identity.delegation import DelegationScope, parse_actors
from bastion.identity.model import Actor, AuthError, Identity
from bastion.identity.oidc import TokenVerifier
from bastion.policy import authorize
from tests.test_oidc_verifier import AUD, RSA_KEY, FakeIssuer

ISS_OTHER = "https://other.example"


def _token(url: str, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": url, "aud": AUD, "sub": "alice", "exp": now + 300, "iat": now, **claims}
    return jwt.encode(body, RSA_KEY, algorithm="RS256", headers={"kid": "rsa1"})


def _verify(claims: dict[str, Any], depth: int = 4, others: tuple[str, ...] = ()) -> Identity:
    async def go() -> Identity:
        async with FakeIssuer() as issuer:
            cfgs = [IssuerConfig(issuer=issuer.url, audience=AUD, max_delegation_depth=depth),
                    *(IssuerConfig(issuer=o, audience=AUD) for o in others)]
            verifier = TokenVerifier(cfgs)
            try:
                return await verifier.verify(_token(issuer.url, **claims))
            finally:
                await verifier.close()

    return asyncio.run(go())


def test_nested_act_becomes_the_chain_current_actor_first() -> None:
    identity = _verify({"act": {"sub": "subagent", "client_id": "sub-client", "act": {"sub": "agent"}}})
    assert [a.subject for a in identity.actors] == ["subagent", "agent"]
    assert identity.actors[0].client_id == "sub-client"
    assert identity.chain == "alice via agent via subagent"
    assert identity.delegated
    # The chain survives the round trips it makes (SSH certificates, live-session rows, manifests).
    assert Identity.from_dict(identity.to_dict()).actors == identity.actors


def test_a_direct_token_has_no_chain_and_no_act_key() -> None:
    identity = _verify({})
    assert identity.actors == () and not identity.delegated
    assert "act" not in identity.to_dict()


@pytest.mark.parametrize(("act", "reason"), [
    ("agent", "bad_actor"),
    ({"client_id": "x"}, "bad_actor"),
    ({"sub": ""}, "bad_actor"),
    ({"sub": "agent", "act": ["nope"]}, "bad_actor"),
    ({"sub": "agent", "iss": "https://evil.example"}, "untrusted_actor"),
    ({"sub": "agent", "act": {"sub": "prior", "iss": 7}}, "untrusted_actor"),
    ({"sub": "a", "act": {"sub": "b", "act": {"sub": "c"}}}, "delegation_too_deep"),
])
def test_malformed_forged_or_too_deep_chains_are_refused(act: Any, reason: str) -> None:
    with pytest.raises(AuthError) as err:
        _verify({"act": act}, depth=2)
    assert err.value.reason == reason
    assert "\n" not in str(err.value) and len(str(err.value)) < 300


def test_an_actor_of_another_configured_issuer_is_accepted() -> None:
    identity = _verify({"act": {"sub": "agent", "iss": ISS_OTHER, "act": {"sub": "x"}}}, others=(ISS_OTHER,))
    assert [(a.subject, a.issuer) for a in identity.actors][0] == ("agent", ISS_OTHER)


def test_depth_zero_refuses_every_delegated_token() -> None:
    with pytest.raises(AuthError, match="deeper than the 0 links"):
        _verify({"act": {"sub": "agent"}}, depth=0)


def test_parse_actors_never_loops_on_a_self_referencing_claim() -> None:
    act: dict[str, Any] = {"sub": "a"}
    act["act"] = act  # only a Python object can do this; JSON cannot, but be sure
    with pytest.raises(AuthError):
        parse_actors(act, "https://i", (), 16)


ALICE = Identity("https://i", "alice", groups=("contractors",))
AGENT_FOR_ALICE = Identity("https://i", "alice", groups=("contractors",),
                           actors=(Actor("subagent"), Actor("agent-7", client_id="ci-agent")))


def test_scope_matches_on_delegation_actors_and_depth() -> None:
    assert DelegationScope(delegated=True).matches(AGENT_FOR_ALICE)
    assert not DelegationScope(delegated=True).matches(ALICE)
    assert DelegationScope(delegated=False).matches(ALICE)
    assert DelegationScope(actors=("agent-*",)).matches(AGENT_FOR_ALICE)
    assert DelegationScope(actors=("ci-*",)).matches(AGENT_FOR_ALICE)  # by client id
    assert not DelegationScope(actors=("bot",)).matches(AGENT_FOR_ALICE)
    assert DelegationScope(max_depth=2).matches(AGENT_FOR_ALICE)
    assert not DelegationScope(max_depth=1).matches(AGENT_FOR_ALICE)


def _config(access: str, approvals: str = "") -> Any:
    text = f"""
[gateway]
data_dir = "/tmp/guarita-delegation-unit"
[[oidc]]
issuer = "https://i"
audience = "guarita"
[[targets]]
name = "web"
host = "127.0.0.1"
logins = ["app"]
host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ0YmJ0YmJ0YmJ0YmJ0YmJ0YmJ0YmJ0YmJ0YmJ0YmJ0YmJ0"]
private_key = "/dev/null"
{access}
{approvals}
"""
    return parse_config(tomllib.loads(text), Path("/tmp"))


def test_access_rule_max_depth_refuses_with_the_reason() -> None:
    cfg = _config('[[access]]\nname = "contractors, one hop"\ngroups = ["contractors"]\nmax_delegation_depth = 1\n')
    target: TargetConfig = cfg.targets[0]
    assert authorize(cfg, ALICE, target, "app").allowed
    refused = authorize(cfg, AGENT_FOR_ALICE, target, "app")
    assert not refused.allowed
    assert "alice via agent-7 via subagent" in refused.reason and "max_delegation_depth of 1" in refused.reason


def test_access_rule_for_direct_tokens_only() -> None:
    cfg = _config('[[access]]\nname = "people"\nsubjects = ["*"]\ndelegated = false\n')
    assert not authorize(cfg, AGENT_FOR_ALICE, cfg.targets[0], "app").allowed
    assert authorize(cfg, ALICE, cfg.targets[0], "app").allowed
    rule: AccessRule = cfg.access[0]
    assert rule.delegation == DelegationScope(delegated=False)


def test_approval_rule_for_anything_acting_for_a_group() -> None:
    from bastion.approvals.rules import Context

    cfg = _config('[[access]]\nname = "all"\nsubjects = ["*"]\n',
                  '[[approvals]]\nname = "agents for contractors"\npattern = ".*"\ngroups = ["contractors"]\n'
                  'delegated = true\napprovers = ["leads"]\n')
    agent_ctx = Context(AGENT_FOR_ALICE, "ssh", "web")
    assert cfg.approvals.command_verdict(agent_ctx, "ls").action == "approve"
    assert cfg.approvals.command_verdict(Context(ALICE, "ssh", "web"), "ls").action == "allow"


@pytest.mark.parametrize("bad", ["delegated = 3", "max_delegation_depth = -1", 'actors = "x"'])
def test_bad_delegation_keys_are_named(bad: str) -> None:
    from bastion.config import ConfigError

    with pytest.raises(ConfigError) as err:
        _config(f'[[access]]\nname = "x"\nsubjects = ["*"]\n{bad}\n')
    assert bad.split(" ")[0] in str(err.value)
