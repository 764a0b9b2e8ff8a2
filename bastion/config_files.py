"""Files a configuration names: present and readable before the gateway starts.

``parse_config`` checks the shape of a config; this checks the files it points at, the way
``serve`` would use them, and names the key of each problem (``bastion check-config`` and
``serve`` both run it, so a missing ``tls_key`` is reported as ``gateway.tls_key: ...``
rather than as ``[Errno 2] No such file or directory`` from deep inside start-up).

Two kinds of file: those the operator must provide (TLS pairs, target keys, kubeconfigs)
must exist and be readable; those the gateway creates on first start (its keys, the masking
secret) must be readable if they exist, and their folder must be creatable.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from bastion.config import Config

Problem = tuple[str, str]


def file_problems(config: Config) -> list[Problem]:
    """Every problem with a file or folder the config names, as (key, message)."""
    problems: list[Problem] = []
    for key, cert, tls_key in (("gateway.tls", config.tls_cert, config.tls_key),
                               ("gateway.kube_tls", config.kube_tls_cert, config.kube_tls_key)):
        if cert is not None and tls_key is not None:
            problems += _tls_pair(key, cert, tls_key)
    for i, target in enumerate(config.targets):
        for name in ("private_key", "ca_key"):
            path = getattr(target, name, None)
            if path is not None:
                problems += _given(f"targets[{i}].{name}", path)
    for i, cluster in enumerate(config.clusters):
        if cluster.kubeconfig is not None:
            problems += _given(f"clusters[{i}].kubeconfig", cluster.kubeconfig)
    created = [("gateway.host_key", config.host_key), ("gateway.user_ca_key", config.user_ca_key),
               ("gateway.target_ca_key", config.target_ca_key), ("recording.key_file", config.recording.key_file)]
    if config.masking is not None:
        created.append(("masking.secret_file", config.masking.secret_file))
    for key, path in created:
        problems += _created(key, path)
    for key, path in (("gateway.data_dir", config.data_dir), ("recording.spool_dir", config.recording.spool_dir)):
        problems += _folder(key, path)
    if config.audit_log not in ("-", ""):
        problems += _created("gateway.audit_log", Path(config.audit_log), append=True)
    return problems


def _given(key: str, path: Path) -> list[Problem]:
    """A file the operator provides: it must be a readable file."""
    if not path.exists():
        return [(key, f"file {path} does not exist")]
    if path.is_dir():
        return [(key, f"{path} is a folder, not a file")]
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        return [(key, f"cannot read {path}: {exc.strerror or exc}")]
    return []


def _created(key: str, path: Path, append: bool = False) -> list[Problem]:
    """A file the gateway creates when missing: readable (or appendable) if present, else its
    folder must exist as a folder or be creatable."""
    if path.exists():
        if path.is_dir():
            return [(key, f"{path} is a folder, not a file")]
        try:
            with open(path, "ab" if append else "rb"):
                pass
        except OSError as exc:
            return [(key, f"cannot {'write' if append else 'read'} {path}: {exc.strerror or exc}")]
        return []
    return _folder(key, path.parent, what=f"the folder of {path}")


def _folder(key: str, path: Path, what: str | None = None) -> list[Problem]:
    """A folder the gateway writes in: a writable folder, or creatable (its nearest existing
    parent is a writable folder)."""
    what = what or str(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return [(key, f"{what}: {existing} is a file, not a folder")]
    if not os.access(existing, os.W_OK | os.X_OK):
        return [(key, f"{what}: {existing} is not writable")]
    return []


def _tls_pair(key: str, cert: Path, tls_key: Path) -> list[Problem]:
    problems = _given(f"{key}_cert", cert) + _given(f"{key}_key", tls_key)
    if problems:
        return problems
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert, tls_key)
    except (ssl.SSLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        return [(f"{key}_cert", f"{cert} and {tls_key} are not a usable certificate and key pair: {reason}")]
    return []
