"""guarita's gateway: front doors, identity, policy and the session pipeline."""

from bastion.logs import capture_warnings as _capture_warnings

_capture_warnings()  # before any dependency is imported: warnings go to the log, not stderr

__version__ = "0.1.0"
