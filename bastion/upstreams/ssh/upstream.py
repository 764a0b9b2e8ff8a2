"""The gateway's own SSH connection to a target, with credentials the agent never sees."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import asyncssh

from bastion.config import TargetConfig
from bastion.identity import Identity
from bastion.identity.usercert import target_certificate
from bastion.refusal import Refused

PREFERRED_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                     "aes128-ctr", "aes192-ctr", "aes256-ctr"]


class TargetError(Refused):
    """The target cannot be used (or may not be, by policy); ``message`` is the one line the
    agent sees."""

    def __init__(self, reason: str, message: str, status: int = 502) -> None:
        super().__init__(reason, message, status)


def _pinned_keys(target: TargetConfig) -> list[asyncssh.SSHKey]:
    keys = []
    for line in target.host_keys:
        parts = line.split()
        keys.append(asyncssh.import_public_key(" ".join(parts[:2])))
    return keys


async def connect_target(target: TargetConfig, login: str, identity: Identity, session_id: str,
                         target_ca: asyncssh.SSHKey) -> asyncssh.SSHClientConnection:
    if target.credential == "ca":
        ca = asyncssh.read_private_key(str(target.ca_key)) if target.ca_key else target_ca
        # The key id names the agent, so the target's own sshd log says who was behind the gateway.
        key, cert = target_certificate(ca, login, f"guarita:{identity.subject}:{session_id}", target.cert_ttl)
        client_keys: list = [(key, cert)]
    else:
        client_keys = [asyncssh.read_private_key(str(Path(str(target.private_key))))]
    where = f"{target.name} ({target.host}:{target.port})"
    try:
        return await asyncio.wait_for(asyncssh.connect(
            target.host, target.port, username=login, client_keys=client_keys,
            known_hosts=(_pinned_keys(target), [], []), agent_path=None, password=None,
            kbdint_auth=False, gss_host=None, preferred_auth="publickey", config=None,
            x509_trusted_certs=None, ignore_encrypted=True,
            # asyncssh prefers chacha20 by default; AES-GCM costs a third less CPU per byte.
            encryption_algs=PREFERRED_CIPHERS,
        ), timeout=target.connect_timeout)
    except TimeoutError:
        raise TargetError("target_timeout", f"target {where} did not answer within {target.connect_timeout:g}s") from None
    except asyncssh.HostKeyNotVerifiable:
        raise TargetError("host_key_mismatch",
                          f"host key of target {where} does not match the pinned key; refusing to connect "
                          "(an operator must check the target and update its host_keys)") from None
    except asyncssh.PermissionDenied:
        raise TargetError("target_auth_failed",
                          f"target {where} refused the gateway's credential for login {login!r}") from None
    except asyncssh.DisconnectError as exc:
        raise TargetError("target_error", f"target {where} closed the connection: {exc.reason}") from None
    except OSError as exc:
        why = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise TargetError("target_unreachable", f"cannot reach target {where}: {why.lower()}") from None
