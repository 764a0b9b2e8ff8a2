"""The SSH front door: ``ssh -p 2222 [LOGIN@]TARGET@bastion`` (``frontdoor.py``)."""
