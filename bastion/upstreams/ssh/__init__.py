"""The gateway's SSH connection to a target (``upstream.py``)."""
