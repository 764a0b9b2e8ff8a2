"""Just-in-time approvals: rules (``rules``), the engine (``engine``), the interactive
command detector (``detector``, ``interactive``) and webhooks (``webhooks``).

Only ``rules`` is imported by the config; the rest is imported where it is used.
"""
