"""What ``bastion serve --dev`` runs for a newcomer to try the product on one machine.

``kubeapi``: a Kubernetes API-server stand-in whose pods run real processes on this
machine (NOT Kubernetes: a development tool; the tests use the same code). The demo SSH
target lives in ``bastion.demo.sshtarget``.
"""
