"""The upstreams: the gateway's own way into what the doors lead to, with credentials the
client never sees. ``ssh/``: a connection to an SSH target (``connect_target``);
``kube/``: a cluster's API server (``ClusterUpstream``, the gateway's kubeconfig)."""
