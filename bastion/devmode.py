"""The embedded default of ``bastion serve --dev``: a config that shows every capability on
one machine, on loopback, and the demo Kubernetes cluster it serves.

The default is a TOML-shaped table parsed by the same code as a config file, so that
``--dev --config FILE`` is one mechanism: the file is overlaid on the table (tables merge,
the file's values win; the file's arrays of tables — targets, access, clusters, approvals,
webhooks, oidc — come before the embedded ones, so its approval rules are checked first),
then the whole is checked like any config.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
import tomllib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bastion.config import Config, ConfigError, is_loopback, parse_config

if TYPE_CHECKING:
    from bastion.demo.kubeapi import KubeAPIStandIn

DEMO_TARGET = "demo"
DEMO_CLUSTER = "demo"
DEV_AUDIENCE = "guarita"


@dataclass(frozen=True)
class DevIdentity:
    """A demo identity `bastion dev-token NAME` mints: its groups give it its role."""

    name: str
    groups: tuple[str, ...]
    does: str


DEV_IDENTITIES = {i.name: i for i in (
    DevIdentity("agent", ("agents",), "runs commands and shells, like an AI agent or a CI job"),
    DevIdentity("approver", ("approvers",), "approves held commands"),
    DevIdentity("auditor", ("auditors",), "reads live sessions and locks"),
    DevIdentity("operator", ("operators",), "locks identities and kills sessions"),
)}

# The demo approval rule: what a newcomer types to see a command held for a human.
_RM_FLAGS = r"(?:-\S+\s+)*"
DEMO_HOLD_PATTERN = (rf"\brm\s+{_RM_FLAGS}(?:-[A-Za-z]*[rR][A-Za-z]*f|-[A-Za-z]*f[A-Za-z]*[rR]|--recursive)"
                     rf"|\brm\s+{_RM_FLAGS}(?:-f\s+{_RM_FLAGS}-[rR]|-[rR]\s+{_RM_FLAGS}-f)"
                     r"|(?i:\bdrop\s+(table|database|schema|index|view|user|role)\b)")


def embedded(data_dir: Path, ssh_port: int, http_port: int, kube_port: int,
             cluster_kubeconfig: Path | None) -> dict[str, Any]:
    """The embedded default as a config table (absolute paths: no base folder applies)."""
    clusters = ([{"name": DEMO_CLUSTER, "kubeconfig": str(cluster_kubeconfig)}]
                if cluster_kubeconfig is not None else [])
    access: list[dict[str, Any]] = [
        {"name": "dev: everyone may use the demo target", "subjects": ["*"], "targets": [DEMO_TARGET]}]
    if clusters:
        access.append({"name": "dev: everyone may use the demo cluster", "subjects": ["*"],
                       "clusters": [DEMO_CLUSTER], "port_forward": True})
    return {
        "gateway": {"ssh_listen": f"127.0.0.1:{ssh_port}", "http_listen": f"127.0.0.1:{http_port}",
                    "kube_listen": f"127.0.0.1:{kube_port}", "audit_log": str(data_dir / "audit.jsonl")},
        "oidc": [{"issuer": f"http://127.0.0.1:{http_port}/dev", "audience": DEV_AUDIENCE, "leeway": "5s"}],
        "access": access,
        "clusters": clusters,
        # Live output and recordings: CPFs, e-mails, phones and cards printed by the demo target and pods.
        "masking": {"secret_file": str(data_dir / "masking.key"), "default_apply": "both"},
        "approvals": [{"name": "dev: rm -rf and DROP need an approver", "pattern": DEMO_HOLD_PATTERN,
                       "approvers": ["approvers", "sre"], "timeout": "10m",
                       "message": "the demo rule: rm -rf and DROP wait for an approver"}],
        # `--group sre` (the README's first example, the console's `alice`) holds every role: an
        # approver of the demo rule (never of its own requests), an operator and an auditor.
        "roles": {"operators": {"groups": ["operators", "sre"]},
                  "auditors": {"groups": ["auditors", "audit", "sre"]}},
    }


def overlay(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``: tables merge, values of ``top`` win, arrays of tables of ``top``
    come first."""
    out = dict(base)
    for key, value in top.items():
        below = out.get(key)
        if isinstance(value, dict) and isinstance(below, dict):
            out[key] = overlay(below, value)
        elif isinstance(below, list) and _tables(value) and _tables(below):
            out[key] = [*value, *below]
        else:
            out[key] = value
    return out


def _tables(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, dict) for v in value)


def dev_config(data_dir: Path, ssh_port: int = 2222, http_port: int = 8080, recordings: str | None = None,
               audit_log: str | None = None, kube_port: int = 8443, cluster_kubeconfig: Path | None = None,
               overlay_file: Path | None = None) -> Config:
    """The embedded default, with ``overlay_file`` over it; ConfigError names the key at fault."""
    return dev_raw_config(data_dir, ssh_port, http_port, recordings, audit_log, kube_port, cluster_kubeconfig,
                          overlay_file)[1]


def dev_raw_config(data_dir: Path, ssh_port: int = 2222, http_port: int = 8080, recordings: str | None = None,
                   audit_log: str | None = None, kube_port: int = 8443, cluster_kubeconfig: Path | None = None,
                   overlay_file: Path | None = None) -> tuple[dict[str, Any], Config]:
    """:func:`dev_config` with the merged raw table it was parsed from (what SIGHUP compares)."""
    data_dir = data_dir.resolve()
    raw = embedded(data_dir, ssh_port, http_port, kube_port, cluster_kubeconfig)
    base = data_dir
    if overlay_file is not None:
        try:
            top = tomllib.loads(overlay_file.read_text())
        except FileNotFoundError:
            raise ConfigError([(str(overlay_file), "file not found")]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError([(str(overlay_file), f"cannot read it: {exc}")]) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError([(str(overlay_file), f"not valid TOML: {exc}")]) from None
        if "data_dir" in top.get("gateway", {}):
            raise ConfigError([("gateway.data_dir", "in --dev the data folder is --data-dir (default ./guarita-data)")])
        raw = overlay(raw, top)
        base = overlay_file.resolve().parent
    config = parse_config(raw, base=base, overrides={"data_dir": data_dir, "recordings": recordings})
    # The local issuer is the first (the gateway's DevIssuer signs for issuers[0]).
    local = next(i for i in config.issuers if i.issuer == f"http://127.0.0.1:{http_port}/dev")
    issuers = (local, *(i for i in config.issuers if i is not local))
    config = replace(config, issuers=issuers, dev=True, demo_target=True,
                     audit_log=audit_log or config.audit_log)
    refuse_outside_loopback(config)
    return raw, config


def refuse_outside_loopback(config: Config) -> None:
    """--dev mints tokens for anyone who asks: it must never listen beyond this machine."""
    problems = [(key, f"{host}:{port} is not loopback: --dev mints tokens for anyone who asks and serves plain "
                      "HTTP; use 127.0.0.1 (or run with --config FILE for a real deployment)")
                for key, (host, port) in (("gateway.ssh_listen", config.ssh_listen),
                                          ("gateway.http_listen", config.http_listen),
                                          ("gateway.kube_listen", config.kube_listen))
                if not is_loopback(host)]
    if problems:
        raise ConfigError(problems)


class DemoCluster:
    """The demo cluster (pods are processes on this machine, NOT Kubernetes) and a kubeconfig
    with the gateway's own credentials to it. Its files live in a folder of its own (never in
    the data dir: a second --dev on the same folder must not rewrite the first one's)."""

    def __init__(self) -> None:
        from bastion.demo.kubeapi import KubeAPIStandIn

        self.folder = Path(tempfile.mkdtemp(prefix="guarita-demo-cluster-"))
        token = secrets.token_urlsafe(24)  # a fresh one per start: only this gateway reaches the cluster
        self.api: KubeAPIStandIn = KubeAPIStandIn(self.folder, tokens=(token,)).start()
        self.kubeconfig = self.api.kubeconfig(self.folder / "gateway-kubeconfig", token=token)
        self.kubeconfig.chmod(0o600)

    def stop(self) -> None:
        self.api.stop()  # ends the demo pods' processes
        shutil.rmtree(self.folder, ignore_errors=True)


LISTEN_FLAGS = (("ssh_listen", "--ssh-listen", "SSH front door"), ("http_listen", "--http-listen", "HTTP API"),
                ("kube_listen", "--kube-listen", "Kubernetes front door"))


def busy_port(config: Config) -> str | None:
    """One line naming a port another program holds, and the flag that moves it (or None)."""
    for key, flag, what in LISTEN_FLAGS:
        if key == "kube_listen" and not config.clusters:
            continue
        host, port = getattr(config, key)
        if port and not _free(host, port):
            return (f"port {port} ({what}, {host}:{port}) is already in use: stop what holds it, or choose another "
                    f"port with {flag} {host}:PORT")
    return None


def _free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True
