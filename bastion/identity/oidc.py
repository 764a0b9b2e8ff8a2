"""Verify OIDC-issued JWTs against the configured issuers' published signing keys.

Keys come from discovery + JWKS and are cached per issuer. Every refusal is an
AuthError with a machine-readable reason and a one-line explanation for the audit log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt

from bastion.config import FORBIDDEN_ALGORITHMS, IssuerConfig
from bastion.identity.delegation import parse_actors
from bastion.identity.model import AuthError, Identity

log = logging.getLogger("guarita.identity")

# Refetch a healthy cache this often so keys the issuer has withdrawn stop being trusted.
_JWKS_TTL = 3600.0
# Discovery documents and key sets are small; anything bigger is not one.
_MAX_DOCUMENT_BYTES = 1024 * 1024
# Cheap shape check before any decoding: header.payload.signature, base64url. The
# signature may be empty so that `alg: none` tokens get their precise refusal.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

# alg -> (kty, crv or None): a key is only ever used with an algorithm of its own family,
# so a token cannot make an RSA public key act as, say, an HMAC secret.
_KEY_FAMILY: dict[str, tuple[str, str | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"),
    "ES384": ("EC", "P-384"),
    "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}


class _FetchError(Exception):
    pass


@dataclass
class _IssuerState:
    config: IssuerConfig
    keys: list[dict[str, Any]] | None = None
    fetched_at: float = 0.0
    # Every fetch attempt bumps this, so coroutines queued on the lock can tell that
    # somebody else already refreshed while they waited.
    generation: int = 0
    error: str | None = None
    failed_at: float = float("-inf")
    forced_at: float = float("-inf")
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


def _show(value: Any, limit: int = 80) -> str:
    """repr() keeps attacker-supplied values on one line; truncation keeps the line short."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _norm(issuer: str) -> str:
    return issuer.rstrip("/")


class TokenVerifier:
    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        *,
        http_timeout: float = 5.0,
        max_token_bytes: int = 16384,
        refresh_min_interval: float = 30.0,
    ) -> None:
        self._issuers: dict[str, _IssuerState] = {}
        for cfg in issuers:
            self._issuers.setdefault(_norm(cfg.issuer), _IssuerState(cfg))
        self._timeout = aiohttp.ClientTimeout(total=http_timeout)
        self._max_token_bytes = max_token_bytes
        self._refresh_min_interval = refresh_min_interval
        # After a failed fetch, callers get the cached error instead of each waiting for
        # the network again; short, so a recovered issuer is picked up quickly.
        self._failure_backoff = min(5.0, refresh_min_interval)
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._ensure_session()
        # Failures are logged by _refresh; the gateway still starts and /readyz says why.
        await asyncio.gather(*(self._refresh(st, st.generation) for st in self._issuers.values()))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def keys_ready(self) -> bool:
        return all(st.keys is not None for st in self._issuers.values())

    async def verify(self, token: str, method: str = "bearer") -> Identity:
        token, header, claims = self._parse(token)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg in FORBIDDEN_ALGORITHMS:
            raise AuthError("alg_not_allowed", f"token algorithm {_show(alg)} is never accepted")
        iss = claims.get("iss")
        st = self._issuers.get(_norm(iss)) if isinstance(iss, str) else None
        if st is None:
            raise AuthError("unknown_issuer", f"issuer {_show(iss)} is not configured")
        cfg = st.config
        if alg not in cfg.algorithms or alg not in _KEY_FAMILY:
            raise AuthError("alg_not_allowed", f"algorithm {_show(alg)} is not allowed for {cfg.issuer}")

        key = await self._key_for(st, header.get("kid"), alg)
        try:
            payload = jwt.decode(
                token,
                key=key,
                algorithms=[alg],
                audience=cfg.audience,
                issuer=(_norm(cfg.issuer), _norm(cfg.issuer) + "/"),
                leeway=cfg.leeway,
                # iat is informational: a skewed issuer clock must not lock agents out.
                # sub/jti: the subject claim is configurable and checked in _identity.
                options={"require": ["exp", "iss", "aud"], "verify_iat": False,
                         "verify_sub": False, "verify_jti": False},
            )
        except jwt.PyJWTError as exc:
            raise self._explain(exc, claims, cfg, header.get("kid")) from None
        identity = self._identity(payload, cfg, method)
        if payload.get("act") is None:
            return identity
        # RFC 8693 delegation: the signature vouches for the claim; each link must still name
        # an issuer the gateway knows, and the chain is bounded (bastion/identity/delegation.py).
        actors = parse_actors(payload["act"], cfg.issuer, (st.config.issuer for st in self._issuers.values()),
                              cfg.max_delegation_depth)
        return dataclasses.replace(identity, actors=actors)

    # -- token parsing and claim mapping --------------------------------------------

    def _parse(self, token: Any) -> tuple[str, dict[str, Any], dict[str, Any]]:
        if not isinstance(token, str):
            raise AuthError("malformed", f"token must be a string, got {type(token).__name__}")
        if len(token) > self._max_token_bytes:
            raise AuthError("too_large", f"token is {len(token)} bytes, more than {self._max_token_bytes}")
        token = token.strip()
        if not token:
            raise AuthError("malformed", "token is empty")
        if not _COMPACT_JWS.fullmatch(token):
            raise AuthError("malformed", "token is not a JWT (three base64url parts separated by dots)")
        try:
            header = jwt.get_unverified_header(token)
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise AuthError("malformed", f"token cannot be decoded: {exc}") from None
        if not isinstance(claims, dict):
            raise AuthError("malformed", "token payload is not a JSON object")
        return token, header, claims

    @staticmethod
    def _explain(exc: jwt.PyJWTError, claims: dict[str, Any], cfg: IssuerConfig, kid: Any) -> AuthError:
        if isinstance(exc, jwt.ExpiredSignatureError):
            return AuthError("expired", f"token expired {time.time() - int(claims['exp']):.0f}s ago")
        if isinstance(exc, jwt.ImmatureSignatureError):
            wait = int(claims["nbf"]) - time.time()
            return AuthError("not_yet_valid", f"token not valid for another {wait:.0f}s")
        if isinstance(exc, jwt.MissingRequiredClaimError):
            return AuthError("missing_claim", f"token has no {exc.claim!r} claim")
        if isinstance(exc, jwt.InvalidAudienceError):
            return AuthError("wrong_audience", f"audience {_show(claims.get('aud'))} is not {cfg.audience!r}")
        if isinstance(exc, jwt.InvalidIssuerError):
            return AuthError("unknown_issuer", f"issuer {_show(claims.get('iss'))} is not {cfg.issuer!r}")
        if isinstance(exc, jwt.InvalidSignatureError):
            return AuthError("bad_signature",
                             f"signature does not verify with key {_show(kid)} of {cfg.issuer}")
        if isinstance(exc, jwt.InvalidAlgorithmError):
            return AuthError("alg_not_allowed", f"{exc}")
        return AuthError("malformed", f"token rejected: {exc}")

    @staticmethod
    def _identity(payload: dict[str, Any], cfg: IssuerConfig, method: str) -> Identity:
        subject = payload.get(cfg.subject_claim)
        if not isinstance(subject, str) or not subject:
            raise AuthError("missing_claim", f"claim {cfg.subject_claim!r} must be a non-empty string")
        exp = payload["exp"]
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            raise AuthError("malformed", f"claim 'exp' must be a number, got {_show(exp)}")
        email = payload.get(cfg.email_claim)
        return Identity(
            issuer=cfg.issuer,
            subject=subject,
            groups=_groups(payload.get(cfg.groups_claim)),
            email=email if isinstance(email, str) and email else None,
            claims={n: str(payload[n]) for n in cfg.extra_claims if payload.get(n) is not None},
            expires_at=float(exp),
            method=method,
        )

    # -- keys -----------------------------------------------------------------------

    async def _key_for(self, st: _IssuerState, kid: Any, alg: str) -> jwt.PyJWK:
        found = self._match(await self._keyset(st), kid, alg)
        if found is None and time.monotonic() - st.forced_at >= self._refresh_min_interval:
            # Maybe the issuer rotated. Rate-limited per issuer: forged kids must not
            # turn the gateway into a JWKS-fetching amplifier.
            st.forced_at = time.monotonic()
            await self._refresh(st, st.generation)
            if st.error is not None:
                raise self._unavailable(st)
            found = self._match(st.keys or [], kid, alg)
        if found is None:
            what = f"no key {_show(kid)}" if kid is not None else f"no kid and no single {alg} key"
            raise AuthError("unknown_kid", f"token has {what} in the JWKS of {st.config.issuer}")
        try:
            return jwt.PyJWK(found, algorithm=alg)
        except jwt.PyJWTError as exc:
            raise AuthError("jwks_unavailable",
                            f"signing key {_show(kid)} of {st.config.issuer} is unusable: {exc}") from None

    @staticmethod
    def _match(keys: list[dict[str, Any]], kid: Any, alg: str) -> dict[str, Any] | None:
        kty, crv = _KEY_FAMILY[alg]
        fits = [k for k in keys if k.get("kty") == kty and (crv is None or k.get("crv") == crv)
                and k.get("alg") in (None, alg)]
        if kid is None:
            # Tolerated only when unambiguous: some small issuers publish one key and no kid.
            return fits[0] if len(fits) == 1 else None
        named = [k for k in keys if k.get("kid") == kid]
        if named and not any(k in fits for k in named):
            k = named[0]
            raise AuthError("alg_not_allowed", f"algorithm {alg} does not fit key {_show(kid)} "
                            f"(kty {_show(k.get('kty'))}, alg {_show(k.get('alg'))})")
        return next((k for k in named if k in fits), None)

    async def _keyset(self, st: _IssuerState) -> list[dict[str, Any]]:
        now = time.monotonic()
        stale = st.keys is None or now - st.fetched_at > _JWKS_TTL
        if stale and now - st.failed_at >= self._failure_backoff:
            await self._refresh(st, st.generation)
        if st.keys is None:
            raise self._unavailable(st)
        # A failed TTL refresh keeps the previous keys: they were the issuer's keys an
        # hour ago, and refusing everyone during an issuer blip helps nobody.
        return st.keys

    @staticmethod
    def _unavailable(st: _IssuerState) -> AuthError:
        return AuthError("jwks_unavailable", f"cannot fetch signing keys from {st.config.issuer}: {st.error}")

    async def _refresh(self, st: _IssuerState, seen: int) -> None:
        async with st.lock:
            if st.generation != seen:
                return  # another caller fetched while we waited for the lock
            st.generation += 1
            try:
                keys = await self._fetch_keys(st.config)
            except _FetchError as exc:
                st.error, st.failed_at = " ".join(str(exc).split()), time.monotonic()
                log.warning("cannot fetch signing keys from %s: %s", st.config.issuer, exc)
                return
            st.keys, st.fetched_at, st.error = keys, time.monotonic(), None
            log.info("fetched %d signing keys for %s", len(keys), st.config.issuer)

    async def _fetch_keys(self, cfg: IssuerConfig) -> list[dict[str, Any]]:
        jwks_uri = cfg.jwks_uri
        if not jwks_uri:
            url = _norm(cfg.issuer) + "/.well-known/openid-configuration"
            doc = await self._get_json(url)
            # OIDC Discovery §4.3: a document naming another issuer must not be trusted.
            if not isinstance(doc.get("issuer"), str) or _norm(doc["issuer"]) != _norm(cfg.issuer):
                raise _FetchError(f"{url} names issuer {_show(doc.get('issuer'))}, not {cfg.issuer!r}")
            jwks_uri = doc.get("jwks_uri")
            if not isinstance(jwks_uri, str) or not jwks_uri.startswith(("https://", "http://")):
                raise _FetchError(f"{url} has no usable jwks_uri: {_show(jwks_uri)}")
        jwks = await self._get_json(jwks_uri)
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise _FetchError(f"{jwks_uri} is not a JWK set (no 'keys' list)")
        keys = [k for k in keys if isinstance(k, dict) and isinstance(k.get("kty"), str)
                and k.get("use") in (None, "sig")]
        if not keys:
            raise _FetchError(f"{jwks_uri} contains no signing keys")
        return keys

    async def _get_json(self, url: str) -> dict[str, Any]:
        try:
            async with self._ensure_session().get(url, headers={"Accept": "application/json"}) as resp:
                if resp.status != 200:
                    raise _FetchError(f"GET {url}: HTTP {resp.status}")
                body = b""
                async for chunk in resp.content.iter_chunked(65536):
                    body += chunk
                    if len(body) > _MAX_DOCUMENT_BYTES:
                        raise _FetchError(f"GET {url}: response larger than {_MAX_DOCUMENT_BYTES} bytes")
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            raise _FetchError(f"GET {url}: {type(exc).__name__} {exc}".strip()) from None
        try:
            doc = json.loads(body)
        except ValueError:
            raise _FetchError(f"GET {url}: response is not JSON") from None
        if not isinstance(doc, dict):
            raise _FetchError(f"GET {url}: response is not a JSON object")
        return doc

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session


def _groups(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        items: list[Any] = re.split(r"[,\s]+", value)
    elif isinstance(value, list | tuple):
        items = list(value)
    else:
        return ()
    # Order-preserving de-duplication; non-strings are dropped, not stringified, so a
    # nested object can never accidentally equal a group name.
    return tuple(dict.fromkeys(g.strip() for g in items if isinstance(g, str) and g.strip()))
