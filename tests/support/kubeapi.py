"""The Kubernetes API-server stand-in the tests use: one implementation with ``bastion serve
--dev``'s demo cluster, in bastion/demo/kubeapi.py (this module re-exports it)."""

from bastion.demo.kubeapi import *  # noqa: F403
from bastion.demo.kubeapi import (  # noqa: F401 - names tests may import that * leaves out
    API_RESOURCES,
    ATTACH_PROGRAMS,
    V4,
    V5,
    KubeAPIStandIn,
    Seen,
    TestCA,
    make_pod,
)
