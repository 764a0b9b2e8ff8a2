"""Gateway state (approvals, commands index, live sessions, locks) behind one store.

``open_state(url)``: ``sqlite:///PATH`` (the default, ``DATA_DIR/state.db``) or
``postgresql://USER@HOST:PORT/DB`` when several replicas share the state. ``NotFound`` is
guarita's one (recorder/objects.py); this store raises it as ``StateNotFound``.
"""

from bastion.state.store import (
    Conflict,
    NotFound,
    StateError,
    StateNotFound,
    StateStore,
    engine_url,
    new_id,
)


def open_state(url: str, replica_name: str | None = None, poll_interval: float = 1.0) -> StateStore:
    return StateStore(url, replica_name=replica_name, poll_interval=poll_interval)


__all__ = ["Conflict", "NotFound", "StateError", "StateNotFound", "StateStore", "engine_url", "new_id", "open_state"]
