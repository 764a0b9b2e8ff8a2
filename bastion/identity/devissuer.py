"""The local development OIDC issuer behind ``bastion serve --dev``.

It only mints tokens and publishes discovery + JWKS; the gateway verifies its tokens
through the same TokenVerifier path as any real issuer, so --dev exercises real code.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from jwt.algorithms import OKPAlgorithm, RSAAlgorithm

from recorder.secretfile import write_secret

# RFC 7638 §3.2: the thumbprint covers only the required members of each key type.
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "OKP": ("crv", "kty", "x")}


class DevIssuer:
    def __init__(self, key_path: Path, issuer_url: str, audience: str = "guarita") -> None:
        self.issuer_url = issuer_url.rstrip("/")
        self.audience = audience
        self._key = _load_or_create_key(Path(key_path))
        if isinstance(self._key, rsa.RSAPrivateKey):
            self._alg = "RS256"
            jwk = RSAAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        else:
            self._alg = "EdDSA"
            jwk = OKPAlgorithm.to_jwk(self._key.public_key(), as_dict=True)
        self.kid = _thumbprint(jwk)
        self._public_jwk = {**jwk, "kid": self.kid, "use": "sig", "alg": self._alg}
        # code -> (expires, claims, client_id, redirect_uri, PKCE challenge): the console's sign-in.
        self._codes: dict[str, tuple[float, dict[str, Any], str, str, str]] = {}

    def mint(
        self,
        subject: str,
        groups: Sequence[str] = (),
        email: str | None = None,
        ttl: float = 3600,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": self.issuer_url,
            "aud": self.audience,
            "sub": subject,
            "groups": list(groups),
            "iat": now,
            "nbf": now,
            "exp": now + int(ttl),
            "jti": uuid.uuid4().hex,
        }
        if email is not None:
            claims["email"] = email
        # Last, so tests and demos can override anything (an expired exp, another aud...).
        claims.update(extra or {})
        return jwt.encode(claims, self._key, algorithm=self._alg, headers={"kid": self.kid})

    def discovery(self) -> dict[str, Any]:
        return {
            "issuer": self.issuer_url,
            "jwks_uri": self.issuer_url + "/jwks",
            "id_token_signing_alg_values_supported": [self._alg],
            "response_types_supported": ["id_token", "code"],
            "subject_types_supported": ["public"],
            # The console's sign-in page for demo identities (bastion/console/devlogin.py).
            "authorization_endpoint": self.issuer_url + "/authorize",
            "token_endpoint": self.issuer_url + "/oauth/token",
            "code_challenge_methods_supported": ["S256"],
            "grant_types_supported": ["authorization_code"],
        }

    def issue_code(self, claims: Mapping[str, Any], client_id: str, redirect_uri: str, challenge: str) -> str:
        """A one-time authorization code (60 s) for the console's sign-in in --dev."""
        now = time.monotonic()
        self._codes = {c: v for c, v in self._codes.items() if v[0] > now}
        code = base64.urlsafe_b64encode(os.urandom(24)).rstrip(b"=").decode()
        self._codes[code] = (now + 60, dict(claims), client_id, redirect_uri, challenge)
        return code

    def redeem(self, code: str, client_id: str, redirect_uri: str, verifier: str) -> str:
        """The access token for a code, once; ValueError names what does not match."""
        entry = self._codes.pop(code, None)
        if entry is None or entry[0] < time.monotonic():
            raise ValueError("unknown, used or expired code")
        _, claims, want_client, want_uri, challenge = entry
        computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()
        if client_id != want_client or redirect_uri != want_uri or computed != challenge:
            raise ValueError("client_id, redirect_uri or code_verifier does not match the authorization request")
        return self.mint(str(claims["sub"]), groups=claims.get("groups") or [], email=claims.get("email"),
                         ttl=float(claims.get("ttl") or 3600))

    def jwks(self) -> dict[str, Any]:
        return {"keys": [dict(self._public_jwk)]}


def _load_or_create_key(path: Path) -> rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
        # Of two processes racing to create it, both end up using the same complete file.
        if not write_secret(path, pem):
            return _load_or_create_key(path)
        return key
    loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        raise ValueError(f"{path}: the dev issuer key must be RSA or Ed25519, got {type(loaded).__name__}")
    return loaded


def _thumbprint(jwk: Mapping[str, Any]) -> str:
    members = {m: jwk[m] for m in _THUMBPRINT_MEMBERS[jwk["kty"]]}
    digest = hashlib.sha256(json.dumps(members, separators=(",", ":"), sort_keys=True).encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
