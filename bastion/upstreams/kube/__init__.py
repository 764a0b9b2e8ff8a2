"""The gateway's way into each cluster: its API server (``upstream.py``) and the gateway's
own credentials for it (``credentials.py``, kubernetes-asyncio's kubeconfig loader)."""
