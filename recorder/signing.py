"""The gateway's Ed25519 recording key: signs manifests so that any change is detectable."""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from recorder.secretfile import write_secret

ENV_VAR = "GUARITA_RECORDING_KEY"  # PEM text, for deployments that inject secrets by environment


def canonical_json(obj: Any) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def public_key_id(raw: bytes) -> str:
    return "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]


class RecordingKey:
    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        self.public_raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = public_key_id(self.public_raw)

    @classmethod
    def load_or_create(cls, path: Path) -> RecordingKey:
        """From $GUARITA_RECORDING_KEY, else from ``path``, else a new key saved there (mode 0600)."""
        pem = os.environ.get(ENV_VAR)
        if pem:
            return cls(_load_pem(pem.encode(), ENV_VAR))
        if path.exists():
            return cls(_load_pem(path.read_bytes(), str(path)))
        key = Ed25519PrivateKey.generate()
        data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())
        if not write_secret(path, data):  # another process created it first: that key it is
            return cls(_load_pem(path.read_bytes(), str(path)))
        return cls(key)

    def public_pem(self) -> str:
        return self._private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def sign(self, body: dict[str, Any]) -> str:
        return base64.b64encode(self._private.sign(canonical_json(body))).decode()


def load_public_key(text: str) -> bytes:
    """A public key as PEM, or base64 of the 32 raw bytes (as manifests carry it) -> raw bytes."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("not an Ed25519 public key")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raw = base64.b64decode(text, validate=True)
    if len(raw) != 32:
        raise ValueError("an Ed25519 public key is 32 bytes")
    return raw


def verify_signature(public_raw: bytes, body: dict[str, Any], signature_b64: str) -> bool:
    try:
        Ed25519PublicKey.from_public_bytes(public_raw).verify(base64.b64decode(signature_b64), canonical_json(body))
    except (InvalidSignature, ValueError):
        return False
    return True


def _load_pem(data: bytes, where: str) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"recording key in {where} is not a readable PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"recording key in {where} must be Ed25519")
    return key
