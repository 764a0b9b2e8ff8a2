"""The real OIDC provider harness issues the tokens the rest of the suite relies on."""

import jwt
import pytest

from tests.support.oidc import OIDCProvider, make_rsa_jwks

SRE = {
    "client_id": "agent-sre",
    "client_secret": "s3cret:/+",
    "groups": ["sre"],
    "email": "agent-sre@example.com",
}
# ~1.5 KB of padding makes the JWT long enough to exercise header/env size limits.
BIG = {
    "client_id": "agent-big",
    "client_secret": "big",
    "groups": ["sre", "dba"],
    "email": "big@example.com",
    "extra": {"padding": "x" * 1200, "tenant": "acme"},
}
ALICE = {"sub": "alice", "groups": ["dev"], "email": "alice@example.com"}


@pytest.fixture(scope="module")
def idp():
    with OIDCProvider(
        clients=[SRE, BIG], users=[ALICE], audience="guarita", token_ttl=3
    ) as provider:
        yield provider


def decode(idp, token, audience="guarita"):
    key = jwt.PyJWKClient(idp.jwks_uri).get_signing_key_from_jwt(token)
    return jwt.decode(token, key.key, algorithms=["RS256"], audience=audience, issuer=idp.issuer)


def test_client_credentials_token_claims(idp):
    token = idp.token("agent-sre")
    header = jwt.get_unverified_header(token)
    assert header["alg"] == "RS256" and header["typ"] == "at+jwt"
    claims = decode(idp, token)
    assert claims["iss"] == idp.issuer
    assert claims["aud"] == "guarita"
    assert claims["sub"] == claims["client_id"] == "agent-sre"
    assert claims["groups"] == ["sre"]
    assert claims["email"] == "agent-sre@example.com"
    assert claims["exp"] - claims["iat"] == 3


def test_large_token(idp):
    token = idp.token("agent-big")
    assert len(token) >= 1500
    claims = decode(idp, token)
    assert claims["tenant"] == "acme" and len(claims["padding"]) == 1200


def test_resource_overrides_audience(idp):
    claims = decode(
        idp,
        idp.token("agent-sre", resource="https://other.example"),
        audience="https://other.example",
    )
    assert claims["aud"] == "https://other.example"


def test_device_flow(idp):
    start = idp.device_authorization()
    assert start["user_code"] and start["verification_uri"].startswith(idp.issuer)
    with pytest.raises(RuntimeError, match="authorization_pending"):
        idp.device_token(start["device_code"])
    idp.approve_device(start["verification_uri_complete"], login="alice")
    tokens = idp.device_token(start["device_code"])
    assert tokens["refresh_token"]
    claims = decode(idp, tokens["access_token"])
    assert (claims["sub"], claims["groups"], claims["email"]) == ("alice", ["dev"], ALICE["email"])


def test_restart_with_rotated_key(tmp_path):
    jwks = make_rsa_jwks(tmp_path / "jwks.json", kid="rotated-1")
    with OIDCProvider(clients=[SRE], jwks_file=tmp_path / "jwks.json") as provider:
        token = provider.token("agent-sre")
        assert jwt.get_unverified_header(token)["kid"] == jwks["keys"][0]["kid"]
        assert decode(provider, token)["groups"] == ["sre"]
