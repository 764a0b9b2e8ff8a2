"""Identity lifecycle on the gateway: locks, session kills, per-identity limits and roles.

:class:`Control` (``gateway.control``) is asked by every front door before a session
opens (:meth:`Control.admit`), keeps the replica's view of the locks in force (read from
the state store, woken by its ``locks`` topic, re-read at least every second) and ends
the live sessions a lock or a kill matches, on whichever replica holds them.
"""

from bastion.control.limits import SessionLimiter, SessionLimits
from bastion.control.locks import LOCK_KINDS, Lock, LockError, parse_lock_target
from bastion.control.manager import Control
from bastion.control.roles import has_role, roles_of

__all__ = ["LOCK_KINDS", "Control", "Lock", "LockError", "SessionLimiter", "SessionLimits", "has_role",
           "parse_lock_target", "roles_of"]
