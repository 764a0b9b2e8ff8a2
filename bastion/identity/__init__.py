"""Who is on the other end of a connection: OIDC verification and SSH user certificates."""

from bastion.identity.model import Actor, AuthError, Identity

__all__ = ["Actor", "AuthError", "Identity"]
