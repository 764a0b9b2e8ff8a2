"""guarita's gateway: front doors, identity, policy and the session pipeline."""

__version__ = "0.1.0"
