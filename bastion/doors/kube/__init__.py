"""The Kubernetes front door: kubectl through guarita (see docs/kubernetes.md)."""
