"""TokenVerifier against a local issuer (aiohttp on 127.0.0.1): the bad-token matrix."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

from bastion.config import IssuerConfig
from bastion.identity.devissuer import DevIssuer
from bastion.identity.model import AuthError, Identity
from bastion.identity.oidc import TokenVerifier

AUD = "guarita"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def public_jwk(key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    algo = RSAAlgorithm if isinstance(key, rsa.RSAPrivateKey) else ECAlgorithm
    jwk = algo.to_jwk(key.public_key(), as_dict=True)
    jwk.update(kid=kid, use="sig")
    if alg:
        jwk["alg"] = alg
    return jwk


class FakeIssuer:
    """Discovery + JWKS on 127.0.0.1 with request counting and failure switches."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.jwks: dict[str, Any] = {
            "keys": [public_jwk(RSA_KEY, "rsa1"), public_jwk(EC_KEY, "ec1", "ES256")]}
        self.discovery: Any = None  # default: computed from the URL
        self.status = 200
        self.hits: Counter[str] = Counter()
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> FakeIssuer:
        app = web.Application()
        app.router.add_get(self.prefix + "/.well-known/openid-configuration", self._discovery)
        app.router.add_get(self.prefix + "/jwks", self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}{self.prefix}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _discovery(self, request: web.Request) -> web.Response:
        self.hits["discovery"] += 1
        if self.status != 200:
            return web.Response(status=self.status, text="boom")
        doc = self.discovery or {"issuer": self.url, "jwks_uri": self.url + "/jwks"}
        return web.json_response(doc)

    async def _jwks(self, request: web.Request) -> web.Response:
        self.hits["jwks"] += 1
        if self.status != 200:
            return web.Response(status=self.status, text="boom")
        return web.json_response(self.jwks)

    def config(self, **kw: Any) -> IssuerConfig:
        return IssuerConfig(issuer=self.url, audience=AUD, extra_claims=("repository", "ref"), leeway=5, **kw)

    def token(self, key: Any = RSA_KEY, alg: str = "RS256", kid: str | None = "rsa1", **claims: Any) -> str:
        now = int(time.time())
        body = {"iss": self.url, "aud": AUD, "sub": "agent-7", "iat": now, "nbf": now, "exp": now + 300}
        body.update(claims)
        body = {k: v for k, v in body.items() if v is not None}
        return jwt.encode(body, key, algorithm=alg, headers={"kid": kid} if kid else None)


def scenario(fn: Callable[[FakeIssuer, TokenVerifier], Awaitable[None]], *, start: bool = True,
             **verifier_kw: Any) -> None:
    """Run ``fn`` with a started issuer and a verifier configured for it."""

    async def main() -> None:
        async with FakeIssuer() as idp:
            verifier = TokenVerifier([idp.config()], **verifier_kw)
            try:
                if start:
                    await verifier.start()
                await fn(idp, verifier)
            finally:
                await verifier.close()

    run(main())


async def refused(verifier: TokenVerifier, token: Any, reason: str) -> str:
    with pytest.raises(AuthError) as info:
        await verifier.verify(token)
    assert info.value.reason == reason, str(info.value)
    message = str(info.value)
    assert message and "\n" not in message
    return message


# -- accepted tokens ----------------------------------------------------------------


def test_valid_rs256_maps_claims_to_identity() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert v.keys_ready()
        exp = int(time.time()) + 120
        token = idp.token(groups=["dev", "ops"], email="a@example.com", exp=exp,
                          repository="acme/app", ref="refs/heads/main", other="ignored")
        ident = await v.verify(token, method="password")
        assert ident == Identity(issuer=idp.url, subject="agent-7", groups=("dev", "ops"),
                                 email="a@example.com",
                                 claims={"repository": "acme/app", "ref": "refs/heads/main"},
                                 expires_at=float(exp), method="password")

    scenario(check)


def test_valid_es256() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        ident = await v.verify(idp.token(EC_KEY, "ES256", "ec1", groups="admins"))
        assert (ident.subject, ident.groups, ident.email) == ("agent-7", ("admins",), None)
        assert ident.method == "bearer"
        # Surrounding whitespace (a password typed with a newline) is harmless.
        assert (await v.verify(" " + idp.token() + "\n")).subject == "agent-7"

    scenario(check)


@pytest.mark.parametrize("groups, expected", [
    ("a b,c, a", ("a", "b", "c")),
    (["x", 3, "", "y"], ("x", "y")),
    (None, ()),
    ({"not": "a list"}, ()),
])
def test_groups_normalised(groups: Any, expected: tuple[str, ...]) -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert (await v.verify(idp.token(groups=groups))).groups == expected

    scenario(check)


def test_issuer_trailing_slash_and_audience_list_tolerated() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        ident = await v.verify(idp.token(iss=idp.url + "/", aud=["other", AUD]))
        assert ident.issuer == idp.url

    scenario(check)


def test_token_without_kid_uses_the_single_key_of_its_type() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert (await v.verify(idp.token(kid=None))).subject == "agent-7"
        idp.jwks["keys"].append(public_jwk(rsa.generate_private_key(65537, 2048), "rsa2"))
        v2 = TokenVerifier([idp.config()], refresh_min_interval=0)
        try:
            # Two RSA keys: ambiguous, so refused rather than guessed.
            await refused(v2, idp.token(kid=None), "unknown_kid")
        finally:
            await v2.close()

    scenario(check)


def test_explicit_jwks_uri_skips_discovery() -> None:
    async def main() -> None:
        async with FakeIssuer() as idp:
            v = TokenVerifier([idp.config(jwks_uri=idp.url + "/jwks")])
            try:
                await v.verify(idp.token())
            finally:
                await v.close()
            assert idp.hits == {"jwks": 1}

    run(main())


# -- refused tokens -----------------------------------------------------------------


def test_expired() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        msg = await refused(v, idp.token(exp=int(time.time()) - 42), "expired")
        assert "expired" in msg and "ago" in msg
        # Within the leeway (5s) still accepted.
        await v.verify(idp.token(exp=int(time.time()) - 2))

    scenario(check)


def test_missing_exp_or_subject() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert "'exp'" in await refused(v, idp.token(exp=None), "missing_claim")
        await refused(v, idp.token(sub=None), "missing_claim")
        await refused(v, idp.token(sub=""), "missing_claim")
        await refused(v, idp.token(sub=123), "missing_claim")
        await refused(v, idp.token(exp="soon"), "malformed")
        await refused(v, idp.token(exp=str(int(time.time()) + 60)), "malformed")

    scenario(check)


def test_configurable_claim_names() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        cfg = idp.config(subject_claim="login", groups_claim="roles", email_claim="mail")
        v2 = TokenVerifier([cfg])
        try:
            ident = await v2.verify(idp.token(sub=42, login="bob", roles="a,b", mail="b@x", groups=["no"]))
            assert (ident.subject, ident.groups, ident.email) == ("bob", ("a", "b"), "b@x")
        finally:
            await v2.close()

    scenario(check)


def test_not_yet_valid() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        await refused(v, idp.token(nbf=int(time.time()) + 600), "not_yet_valid")
        # iat in the future is tolerated (issuer clock skew); nbf/exp are what count.
        await v.verify(idp.token(iat=int(time.time()) + 600))

    scenario(check)


def test_unknown_issuer() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        before = sum(idp.hits.values())
        msg = await refused(v, idp.token(iss="https://evil.example"), "unknown_issuer")
        assert "evil.example" in msg
        await refused(v, idp.token(iss=None), "unknown_issuer")
        assert sum(idp.hits.values()) == before

    scenario(check)


def test_wrong_audience() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert await refused(v, idp.token(aud="x"), "wrong_audience") == "audience 'x' is not 'guarita'"
        await refused(v, idp.token(aud=["x", "y"]), "wrong_audience")
        await refused(v, idp.token(aud=None), "missing_claim")

    scenario(check)


def test_bad_signature_other_key_same_kid() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        forger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        await refused(v, idp.token(forger, kid="rsa1"), "bad_signature")
        # A tampered payload with the genuine signature.
        head, _, sig = idp.token().split(".")
        body = base64.urlsafe_b64encode(json.dumps({"iss": idp.url, "aud": AUD, "sub": "root",
                                                    "exp": time.time() + 300}).encode()).rstrip(b"=")
        await refused(v, f"{head}.{body.decode()}.{sig}", "bad_signature")

    scenario(check)


def test_unknown_kid_refetch_is_rate_limited() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert idp.hits["jwks"] == 1  # prefetch by start()
        for i in range(20):
            msg = await refused(v, idp.token(kid=f"forged-{i}"), "unknown_kid")
        assert "forged-19" in msg
        await asyncio.gather(*(refused(v, idp.token(kid=f"x{i}"), "unknown_kid") for i in range(20)))
        assert idp.hits["jwks"] == 2  # one refetch within refresh_min_interval
        # Known kids keep working without any further fetch.
        await v.verify(idp.token())
        assert idp.hits["jwks"] == 2

    scenario(check, refresh_min_interval=60)


def test_alg_none() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        token = jwt.encode({"iss": idp.url, "aud": AUD, "sub": "root", "exp": time.time() + 300},
                           "", algorithm="none", headers={"kid": "rsa1"})
        assert token.endswith(".")
        await refused(v, token, "alg_not_allowed")

    scenario(check)


def _hs256(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def test_hs256_signed_with_issuer_public_key_is_refused() -> None:
    """The classic key-confusion attack: HMAC with the published public key as secret."""

    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        pem = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                serialization.PublicFormat.SubjectPublicKeyInfo)
        claims = {"iss": idp.url, "aud": AUD, "sub": "root", "exp": int(time.time()) + 300}
        for kid in ("rsa1", None):
            header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
            await refused(v, _hs256(header, claims, pem), "alg_not_allowed")

    scenario(check)


def test_alg_must_be_allowed_and_match_the_key() -> None:
    async def main() -> None:
        async with FakeIssuer() as idp:
            v = TokenVerifier([idp.config(algorithms=("RS256",))])
            try:
                await refused(v, idp.token(EC_KEY, "ES256", "ec1"), "alg_not_allowed")
                await refused(v, idp.token(alg="PS256"), "alg_not_allowed")
            finally:
                await v.close()
            v = TokenVerifier([idp.config()])
            try:
                # An RS256 token naming the EC key, and an ES256 token naming the RSA key.
                await refused(v, idp.token(kid="ec1"), "alg_not_allowed")
                await refused(v, idp.token(EC_KEY, "ES256", "rsa1"), "alg_not_allowed")
                # The JWK's own alg pins it: PS256 with a key published as RS256 is refused.
                idp.jwks["keys"][0]["alg"] = "RS256"
                v2 = TokenVerifier([idp.config()])
                try:
                    await refused(v2, idp.token(alg="PS256"), "alg_not_allowed")
                finally:
                    await v2.close()
                # Without a JWK alg, any RSA algorithm of the allowlist fits the RSA key.
                assert (await v.verify(idp.token(alg="PS256"))).subject == "agent-7"
            finally:
                await v.close()

    run(main())


@pytest.mark.parametrize("token, reason", [
    ("", "malformed"),
    ("garbage", "malformed"),
    ("a.b", "malformed"),
    ("a.b.c.d", "malformed"),
    ("a b.c.d", "malformed"),
    ("!!!.###.$$$", "malformed"),
    ("eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "malformed"),
    ("bm90IGpzb24.e30.c2ln", "malformed"),
    (None, "malformed"),
    (b"a.b.c", "malformed"),
    ("A" * 100_000, "too_large"),
    ("eyJ" + "A" * 100_000 + ".e30.c2ln", "too_large"),
])
def test_garbage_refused_without_network(token: Any, reason: str) -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        started = time.monotonic()
        await refused(v, token, reason)
        assert time.monotonic() - started < 0.5
        assert not idp.hits

    scenario(check, start=False)


# -- key fetching -------------------------------------------------------------------


def test_jwks_returning_500_fails_closed() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        assert not v.keys_ready()
        msg = await refused(v, idp.token(), "jwks_unavailable")
        assert msg.startswith(f"cannot fetch signing keys from {idp.url}: ") and "500" in msg
        idp.status = 200
        await v.verify(idp.token())
        assert v.keys_ready()

    async def main() -> None:
        async with FakeIssuer() as idp:
            idp.status = 500
            v = TokenVerifier([idp.config()], refresh_min_interval=0)
            try:
                await v.start()  # only logs
                await check(idp, v)
            finally:
                await v.close()

    run(main())


def test_issuer_down_fails_closed(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with FakeIssuer() as idp:
            await idp.stop()
            v = TokenVerifier([idp.config()], http_timeout=2)
            try:
                await v.start()
                assert not v.keys_ready()
                msg = await refused(v, idp.token(), "jwks_unavailable")
                assert idp.url in msg
            finally:
                await v.close()

    with caplog.at_level("WARNING", logger="guarita.identity"):
        run(main())
    assert any("cannot fetch signing keys" in r.getMessage() and not r.exc_info for r in caplog.records)


def test_unknown_kid_while_issuer_down_is_jwks_unavailable() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        await idp.stop()
        await v.verify(idp.token())  # cached keys still verify
        await refused(v, idp.token(kid="new"), "jwks_unavailable")

    scenario(check)


@pytest.mark.parametrize("discovery", [
    lambda url: {"issuer": "https://someone-else.example", "jwks_uri": url + "/jwks"},
    lambda url: {"issuer": url},
    lambda url: {"issuer": url, "jwks_uri": "file:///etc/passwd"},
    lambda url: ["not", "an", "object"],
])
def test_invalid_discovery_fails_closed(discovery: Callable[[str], Any]) -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        idp.discovery = discovery(idp.url)
        await refused(v, idp.token(), "jwks_unavailable")
        assert idp.hits == {"discovery": 1}

    scenario(check, start=False)


@pytest.mark.parametrize("jwks", [{"keys": []}, {"nokeys": 1}, {"keys": [{"kty": "RSA", "use": "enc"}]}])
def test_invalid_jwks_fails_closed(jwks: dict[str, Any]) -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        idp.jwks = jwks
        await refused(v, idp.token(), "jwks_unavailable")

    scenario(check, start=False)


def test_key_rotation() -> None:
    async def check(idp: FakeIssuer, v: TokenVerifier) -> None:
        await v.verify(idp.token())
        new_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        idp.jwks = {"keys": [public_jwk(new_key, "rsa2")]}
        ident = await v.verify(idp.token(new_key, kid="rsa2"))
        assert ident.subject == "agent-7"
        assert idp.hits["jwks"] == 2
        # The old key is gone from the refreshed set.
        await refused(v, idp.token(), "unknown_kid")

    scenario(check, refresh_min_interval=0)


# -- dev issuer ---------------------------------------------------------------------


@pytest.mark.parametrize("existing_key", [None, "ed25519"])
def test_dev_issuer_round_trip(tmp_path: Any, existing_key: str | None) -> None:
    key_path = tmp_path / "keys" / "dev_issuer.pem"
    if existing_key:
        key_path.parent.mkdir()
        key_path.write_bytes(ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        key_path.chmod(0o600)

    async def main() -> None:
        async with FakeIssuer(prefix="/dev") as idp:
            dev = DevIssuer(key_path, idp.url + "/")
            assert dev.issuer_url == idp.url
            idp.discovery, idp.jwks = dev.discovery(), dev.jwks()
            assert idp.discovery["jwks_uri"] == idp.url + "/jwks"
            v = TokenVerifier([IssuerConfig(issuer=dev.issuer_url, audience=dev.audience)])
            try:
                token = dev.mint("alice", groups=["dev"], email="alice@example.com", ttl=60,
                                 extra={"team": "blue"})
                header = jwt.get_unverified_header(token)
                assert (header["kid"], header["alg"]) == (dev.kid, "EdDSA" if existing_key else "RS256")
                ident = await v.verify(token, method="keyboard-interactive")
                assert (ident.subject, ident.groups, ident.email) == ("alice", ("dev",), "alice@example.com")
                assert abs(ident.expires_at - (time.time() + 60)) < 5
                await refused(v, dev.mint("alice", ttl=-120), "expired")
            finally:
                await v.close()

    run(main())
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    # The key persists: a restarted dev gateway keeps the same kid.
    assert DevIssuer(key_path, "http://x").kid == DevIssuer(key_path, "http://y").kid


def test_dev_issuer_kid_is_rfc7638_thumbprint(tmp_path: Any) -> None:
    dev = DevIssuer(tmp_path / "k.pem", "http://127.0.0.1:8080/dev")
    jwk = dev.jwks()["keys"][0]
    canonical = json.dumps({"e": jwk["e"], "kty": "RSA", "n": jwk["n"]}, separators=(",", ":"))
    expected = base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()
    assert jwk["kid"] == dev.kid == expected
    assert set(jwk) >= {"kty", "n", "e", "kid", "alg", "use"} and "d" not in jwk
