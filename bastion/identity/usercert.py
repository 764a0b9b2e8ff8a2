"""The gateway's SSH certificate authorities.

* The *user CA* signs certificates for agents (``bastion ssh-cert``): the key id holds
  the verified identity as JSON, so plain ``ssh -i key`` proves who the agent is with
  no token on the wire (OpenSSH truncates passwords at 1,023 bytes; CI tokens are longer).
* The *target CA* signs a short-lived certificate per upstream session, whose key id
  names the agent, so the target's own logs say who was behind the gateway.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import asyncssh

from bastion.identity.model import AuthError, Identity
from recorder.secretfile import write_secret

KEY_ID_PREFIX = "guarita:"


def load_or_create_key(path: Path) -> asyncssh.SSHKey:
    """An Ed25519 private key in OpenSSH format, created (mode 0600) on first use."""
    if path.exists():
        return asyncssh.read_private_key(str(path))
    key = asyncssh.generate_private_key("ssh-ed25519", comment=f"guarita {path.name}")
    if not write_secret(path, key.export_private_key()):  # another process created it first
        return asyncssh.read_private_key(str(path))
    path.with_name(path.name + ".pub").write_bytes(key.export_public_key())
    return key


class UserCA:
    def __init__(self, key: asyncssh.SSHKey, max_ttl: float = 3600.0) -> None:
        self.key = key
        self.max_ttl = max_ttl

    def public_line(self) -> str:
        return self.key.export_public_key().decode().strip()

    def issue(self, identity: Identity, public_key: str, ttl: float | None = None) -> tuple[str, float]:
        """Certificate text (OpenSSH format) and its expiry: never past the token's own expiry."""
        try:
            user_key = asyncssh.import_public_key(public_key)
        except (asyncssh.KeyImportError, ValueError) as exc:
            raise ValueError(f"public_key is not an OpenSSH public key: {exc}") from None
        now = time.time()
        valid_before = min(now + min(ttl or self.max_ttl, self.max_ttl), identity.expires_at or now + self.max_ttl)
        if valid_before <= now + 5:
            raise AuthError("expired", "the token expires too soon to issue a certificate")
        key_id = KEY_ID_PREFIX + identity.to_json()
        # No principals: the login and target come from the SSH user name and are checked by policy.
        cert = self.key.generate_user_certificate(
            user_key, key_id, valid_after=int(now) - 60, valid_before=int(valid_before),
            permit_x11_forwarding=False, permit_agent_forwarding=False, permit_port_forwarding=False,
            permit_user_rc=False)
        return cert.export_certificate().decode().strip(), valid_before

    def identity_from_key_id(self, key_id: str, valid_before: float) -> Identity:
        if not key_id.startswith(KEY_ID_PREFIX):
            raise AuthError("bad_certificate", "certificate was not issued by guarita's user CA")
        try:
            data = json.loads(key_id[len(KEY_ID_PREFIX):])
            identity = Identity.from_dict(data, method="certificate")
        except (ValueError, KeyError, TypeError) as exc:
            raise AuthError("bad_certificate", f"certificate key id is not a guarita identity: {exc}") from None
        return Identity(identity.issuer, identity.subject, identity.groups, identity.email, identity.claims,
                        min(identity.expires_at or valid_before, valid_before), "certificate")


def target_certificate(ca: asyncssh.SSHKey, login: str, key_id: str, ttl: float) -> tuple[asyncssh.SSHKey, asyncssh.SSHCertificate]:
    """A fresh key pair and a certificate valid for ``login`` for ``ttl`` seconds."""
    key = asyncssh.generate_private_key("ssh-ed25519")
    now = int(time.time())
    cert = ca.generate_user_certificate(key, key_id, principals=[login], valid_after=now - 60,
                                        valid_before=now + int(ttl), permit_x11_forwarding=False,
                                        permit_agent_forwarding=False, permit_port_forwarding=False)
    return key, cert
