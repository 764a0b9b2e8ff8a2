"""Who is on the other end of a connection: OIDC verification and SSH user certificates."""

from bastion.identity.model import AuthError, Identity

__all__ = ["AuthError", "Identity"]
