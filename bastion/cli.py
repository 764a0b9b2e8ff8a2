"""The ``bastion`` command: run the gateway, check its config, and get credentials."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any

import click

from bastion.cli_group import AliasGroup
from bastion.config import (
    ConfigError,
    ConfigSource,
    file_source,
    is_loopback,
    load_config,
    parse_duration,
    parse_listen,
)
from bastion.interpreter import tune_for_sessions
from recorder.secretfile import write_secret
from recorder.store import StoreError

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


def _setup_logging(verbose: bool, log_format: str = "auto") -> str:
    """The gateway's log on stderr: JSON lines, or text on a terminal (bastion/logs.py)."""
    from bastion.logs import setup_logging

    return setup_logging(log_format, verbose)


@click.group(cls=AliasGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="guarita")
def main() -> None:
    """guarita: an access gateway that proves who agents are and records what they do."""


# -- serve -----------------------------------------------------------------------------


@main.command()
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="TOML config file.")
@click.option("--dev", is_flag=True, help="Embedded default: local issuer, demo target, local recordings.")
@click.option("--data-dir", type=click.Path(path_type=Path), help="Where keys, spool and (in --dev) recordings live.")
@click.option("--recordings", help="Where recordings go: file:///PATH or s3://BUCKET/PREFIX.")
@click.option("--ssh-listen", help="HOST:PORT of the SSH front door (default 127.0.0.1:2222).")
@click.option("--http-listen", help="HOST:PORT of the HTTP API (default 127.0.0.1:8080).")
@click.option("--audit-log", help="Audit log destination: a file, or - for stdout.")
@click.option("--kube-listen", help="HOST:PORT of the Kubernetes front door (default 127.0.0.1:8443; it starts "
              "when clusters are configured).")
@click.option("--kube-cluster", "kube_clusters", multiple=True, metavar="NAME=KUBECONFIG",
              help="With --dev: serve this cluster through the gateway (repeatable; everyone may use it).")
@click.option("--state", "state_url", help="Where state goes: sqlite:///PATH (default DATA_DIR/state.db) or "
              "postgresql://USER@HOST:PORT/DB (several replicas).")
@click.option("-v", "--verbose", is_flag=True, help="Debug-level log.")
@click.option("--log-format", type=click.Choice(["auto", "json", "text"]), default="auto", show_default=True,
              envvar="GUARITA_LOG_FORMAT", help="The log on stderr: JSON lines, or text; auto: text on a terminal, "
              "JSON otherwise.")
def serve(config_path: Path | None, dev: bool, data_dir: Path | None, recordings: str | None,
          ssh_listen: str | None, http_listen: str | None, audit_log: str | None, verbose: bool,
          kube_listen: str | None = None, kube_clusters: tuple[str, ...] = (), state_url: str | None = None,
          log_format: str = "auto") -> None:
    """Run the gateway. SIGTERM drains it (gateway.drain_grace), SIGHUP reloads its rules."""
    from bastion import devmode
    from bastion.gateway import Gateway

    chosen_format = _setup_logging(verbose, log_format)
    reload_source: ConfigSource | None = None
    if not (config_path or dev):
        raise click.UsageError("give --config FILE, or --dev (with --config FILE: that file over the embedded default)")
    demo_cluster = None
    try:
        if dev:  # bastion/devmode.py: the embedded default, --config FILE overlaid on it
            ssh = parse_listen(ssh_listen or "127.0.0.1:2222")
            http = parse_listen(http_listen or "127.0.0.1:8080")
            kube = parse_listen(kube_listen or "127.0.0.1:8443")
            dev_dir = data_dir or Path("guarita-data")
            for (host, _), flag in ((ssh, "--ssh-listen"), (http, "--http-listen"), (kube, "--kube-listen")):
                if not is_loopback(host):
                    raise click.BadParameter(f"{host} is not loopback: --dev mints tokens for anyone who asks; use "
                                             "127.0.0.1 (or --config FILE without --dev)", param_hint=flag)
            demo_cluster = devmode.DemoCluster()
            kubeconfig = demo_cluster.kubeconfig

            def load_dev() -> tuple[dict[str, Any], Any]:  # at start, and again on SIGHUP
                raw, dev_cfg = devmode.dev_raw_config(dev_dir, ssh_port=ssh[1], http_port=http[1],
                                                      recordings=recordings, audit_log=audit_log,
                                                      kube_port=kube[1], cluster_kubeconfig=kubeconfig,
                                                      overlay_file=config_path)
                return raw, _dev_clusters(dev_cfg, kube_clusters, dev) if kube_clusters else dev_cfg

            raw, config = load_dev()
            if config_path is not None:  # the overlay is what SIGHUP reads again
                reload_source = ConfigSource(config_path, load_dev)
        else:
            assert config_path is not None
            reload_source = file_source(config_path, {"data_dir": data_dir, "recordings": recordings,
                                                      "state": state_url})
            raw, config = reload_source.load()
            if ssh_listen:
                config = replace(config, ssh_listen=parse_listen(ssh_listen))
            if http_listen:
                config = replace(config, http_listen=parse_listen(http_listen))
            if audit_log:
                config = replace(config, audit_log=audit_log)
        if kube_listen:
            config = replace(config, kube_listen=parse_listen(kube_listen))
        if state_url:
            from bastion.state import StateError, engine_url

            try:
                engine_url(state_url)
            except StateError as exc:
                raise click.BadParameter(str(exc), param_hint="--state") from None
            config = replace(config, state_url=state_url)
        if kube_clusters and not dev:
            config = _dev_clusters(config, kube_clusters, dev)  # refused: --kube-cluster is for --dev
        from bastion.config_files import file_problems

        if problems := file_problems(config):
            raise ConfigError(problems)
    except ConfigError as exc:
        if demo_cluster is not None:
            demo_cluster.stop()
        _config_problems(exc)
        sys.exit(2)
    except ValueError as exc:
        if demo_cluster is not None:
            demo_cluster.stop()
        raise click.UsageError(str(exc)) from None
    try:
        asyncio.run(_serve(Gateway, config, reload_source, raw, json_log=chosen_format == "json"))
    finally:
        if demo_cluster is not None:
            demo_cluster.stop()


def _dev_clusters(config: Any, specs: tuple[str, ...], dev: bool) -> Any:
    """--kube-cluster NAME=KUBECONFIG in --dev: the cluster, and a rule letting everyone use it."""
    from bastion.config import AccessRule, ClusterConfig

    if not dev:
        raise ValueError("--kube-cluster is for --dev; in a config file write [[clusters]]")
    clusters = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        kubeconfig = Path(path).expanduser().resolve()
        if not sep or not name or not kubeconfig.is_file():
            raise ValueError(f"--kube-cluster {spec!r}: expected NAME=KUBECONFIG with an existing file")
        clusters.append(ClusterConfig(name=name, kubeconfig=kubeconfig))
    rule = AccessRule(name="dev: everyone may use the clusters", subjects=("*",), targets=(),
                      clusters=tuple(c.name for c in clusters))
    return replace(config, clusters=(*config.clusters, *clusters), access=(*config.access, rule))


async def _serve(gateway_cls: Any, config: Any, reload_source: ConfigSource | None = None,
                 raw: dict[str, Any] | None = None, json_log: bool = False) -> None:
    import signal

    # SIGHUP before the gateway has its handler (it installs it once serving) must not kill it.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    from bastion.instance_lock import InstanceLock, InstanceLocked

    # One gateway per data dir and spool, taken before anything in them is touched; held
    # until the process exits (bastion/instance_lock.py).
    instance_lock = InstanceLock()
    try:
        instance_lock.acquire([config.data_dir, config.recording.spool_dir])
    except InstanceLocked as exc:
        click.echo(f"guarita: cannot start: {exc}", err=True)
        sys.exit(1)
    from bastion.devmode import busy_port

    if busy := busy_port(config):  # named with the flag that moves it, before anything binds
        click.echo(f"guarita: cannot start: {busy}", err=True)
        sys.exit(1)
    try:
        gw = gateway_cls(config)
        if reload_source is not None:  # what SIGHUP reads again (bastion/lifecycle.py)
            gw.config_source, gw.config_raw = reload_source, raw or {}
        await gw.start()
    except (OSError, RuntimeError, ValueError, StoreError) as exc:
        click.echo(f"guarita: cannot start: {_start_error(exc)}", err=True)
        sys.exit(1)
    gw.handle_signals()
    tune_for_sessions()
    _print_welcome(gw, json_log)
    await gw.run_forever()


def _start_error(exc: Exception) -> str:
    """One line naming what failed: an OSError says which path (str() of one often does not)."""
    if isinstance(exc, OSError) and exc.filename is not None:
        target = f" -> {exc.filename2}" if exc.filename2 is not None else ""
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}{target}"
    return str(exc)


def _print_welcome(gw: Any, json_log: bool = False) -> None:
    c = gw.config
    ssh_host = c.ssh_listen[0] if c.ssh_listen[0] not in ("0.0.0.0", "::") else "127.0.0.1"
    port = gw.ssh_port
    http = f"http://{c.http_listen[0]}:{gw.http_port}"
    fp = gw.host_key.get_fingerprint()
    lines = [f"guarita is listening: SSH {ssh_host}:{port}, HTTP API {http}  (host key {fp})",
             f"recordings: {gw.store.url}" + ("" if gw.store.write_once else "  (local folder: not write-once)")]
    if gw.kube_port:
        kube_host = c.kube_listen[0] if c.kube_listen[0] not in ("0.0.0.0", "::") else "127.0.0.1"
        lines.append(f"Kubernetes: https://{kube_host}:{gw.kube_port}/clusters/NAME for "
                     f"{', '.join(cl.name for cl in c.clusters)}  (kubeconfig: bastion kubeconfig --cluster NAME"
                     f" --gateway {http})")
    if c.dev:  # the tour (bastion/devtour.py): `bastion demo` runs these very lines
        from bastion import devtour

        where = devtour.Where(ssh_host=ssh_host, ssh_port=port, http_url=http, data_dir=str(c.data_dir),
                              kube=bool(gw.kube_port) and c.cluster("demo") is not None,
                              console=_has_console(), host_key=gw.host_key.export_public_key().decode().strip(),
                              forward_port=devtour.free_port())
        where.save(c.data_dir)
        lines += ["", "Development mode: a local token issuer, a demo SSH target 'demo' that runs a real shell, a demo "
                  "cluster 'demo' whose pods are processes on this machine (not Kubernetes), masking, and an "
                  "approval rule (rm -rf and DROP wait for an approver).", *devtour.banner(where)]
    if json_log:  # one JSON line each, like the rest of the log
        welcome = logging.getLogger("guarita")
        for line in lines:
            if line.strip():
                welcome.info("%s", line.strip(), extra={"ssh_port": port, "http_port": gw.http_port})
        return
    click.echo("\n".join(lines), err=True)


def _has_console() -> bool:
    """The web console (bastion/console), when this install has it: the tour then names it."""
    import importlib.util

    return importlib.util.find_spec("bastion.console") is not None


def _config_problems(exc: ConfigError) -> None:
    click.echo("guarita: the configuration has problems:", err=True)
    for key, message in exc.problems:
        click.echo(f"  {key}: {message}", err=True)


@main.command("config-reference")
@click.option("--output", "-o", type=click.Path(path_type=Path), help="Write it to this file (docs/configuration.md).")
def config_reference(output: Path | None) -> None:
    """Print the configuration reference (every key, markdown), generated from the code."""
    from bastion.config_reference import render

    text = render()
    if output is not None:
        output.write_text(text)
    else:
        click.echo(text, nl=False)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
@click.option("--skip-files", is_flag=True, help="Check the config's keys and values only, not the files it names "
              "(for a config written for another machine: a container, a Helm chart).")
def check_config(config_path: Path, skip_files: bool = False) -> None:
    """Validate a config file and the files it names; print every problem with the key that has it."""
    from bastion.config_files import file_problems

    try:
        config = load_config(config_path)
        problems = [] if skip_files else file_problems(config)
        if problems:
            raise ConfigError(problems)
    except ConfigError as exc:
        _config_problems(exc)
        sys.exit(2)
    click.echo(f"{config_path}: OK ({len(config.issuers)} issuer(s), {len(config.targets)} target(s), "
               f"{len(config.access)} access rule(s), {len(config.approvals.rules)} approval rule(s); "
               f"recordings to {config.recording.url})" + ("; files not checked (--skip-files)" if skip_files else ""))


# -- credentials -------------------------------------------------------------------------


def _gateway_url(url: str | None) -> str:
    return (url or os.environ.get("GUARITA_URL") or DEFAULT_GATEWAY).rstrip("/")


def _post(url: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            detail = json.loads(exc.read()).get("message", "")
        except ValueError:
            detail = ""
        raise click.ClickException(f"{url}: HTTP {exc.code} {detail}".strip()) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach the gateway at {url}: {reason} "
                                   "(is `bastion serve` running? set --gateway or GUARITA_URL)") from None


def read_token(token_file: Path | None = None) -> str | None:
    """The caller's token: $GUARITA_TOKEN, or the file in --token-file / $GUARITA_TOKEN_FILE
    (a CI job's OIDC token, a projected service-account token)."""
    if token_file is None and os.environ.get("GUARITA_TOKEN"):
        return os.environ["GUARITA_TOKEN"].strip()
    path = token_file or (Path(os.environ["GUARITA_TOKEN_FILE"]) if os.environ.get("GUARITA_TOKEN_FILE") else None)
    if path is not None:
        try:
            return path.read_text().strip()
        except OSError as exc:
            raise click.ClickException(f"cannot read token file {path}: {exc.strerror}") from None
    return None


@main.command("dev-token")
@click.argument("name", required=False)
@click.option("--sub", help="Subject of the token (instead of a demo identity's NAME).")
@click.option("--group", "groups", multiple=True, help="A group (repeatable).")
@click.option("--email", help="The token's email claim.")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime, e.g. 10m, 1h.")
@click.option("--claim", "claims", multiple=True, help="Extra claim NAME=VALUE (repeatable).")
@click.option("--gateway", help=f"Gateway HTTP API (default $GUARITA_URL or {DEFAULT_GATEWAY}).")
def dev_token(name: str | None, sub: str | None, groups: tuple[str, ...], email: str | None, ttl: str,
              claims: tuple[str, ...], gateway: str | None) -> None:
    """Mint a token from the --dev gateway's local issuer and print it: for a demo identity
    by NAME (agent, approver, auditor, operator), or for any --sub and --group."""
    from bastion.devmode import DEV_IDENTITIES

    if bool(name) == bool(sub):
        raise click.UsageError("give a demo identity's NAME (" + ", ".join(DEV_IDENTITIES) + ") or --sub SUBJECT")
    if name:
        identity = DEV_IDENTITIES.get(name)
        if identity is None:
            raise click.BadParameter(f"{name!r} is not a demo identity: " + "; ".join(
                f"{i.name} ({i.does})" for i in DEV_IDENTITIES.values()) + "; or give --sub", param_hint="NAME")
        sub, groups = identity.name, (*identity.groups, *groups)
    extra = dict(c.split("=", 1) for c in claims if "=" in c)
    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    body = {"sub": sub, "groups": list(groups), "email": email, "ttl": seconds, "claims": extra}
    click.echo(_post(_gateway_url(gateway) + "/dev/token", body)["token"])


@main.command("mcp")
@click.option("--gateway", help=f"Gateway HTTP API (default $GUARITA_URL or {DEFAULT_GATEWAY}).")
@click.option("--token-file", type=click.Path(path_type=Path), help="Read your token from this file.")
def mcp_stdio(gateway: str | None, token_file: Path | None) -> None:
    """Serve guarita's MCP tools on stdin/stdout, for MCP clients that launch a local server
    (Claude Desktop, Cursor ...). Every call goes to the gateway's /mcp with your token,
    obtained as `bastion token` does; see docs/mcp.md."""
    import anyio

    from bastion.doors.mcp.stdio import serve_stdio

    if not obtain_token(token_file):
        raise click.ClickException(NO_TOKEN)
    anyio.run(serve_stdio, _gateway_url(gateway), lambda: obtain_token(token_file))


NO_TOKEN = ("no token: run `bastion login`, or set GUARITA_TOKEN, or GUARITA_TOKEN_FILE / --token-file, or "
            "GUARITA_CLIENT_ID + GUARITA_CLIENT_SECRET + GUARITA_ISSUER for a client-credentials grant")


def obtain_token(token_file: Path | None = None) -> str | None:
    """read_token(), else a cached client-credentials token (see bastion.doors.kube.client), else
    the token of `bastion login` (refreshed when needed, see bastion.login)."""
    from bastion.doors.kube.client import TokenError, client_credentials_token
    from bastion.login import cached_token

    value = read_token(token_file)
    if value:
        return value
    try:
        return client_credentials_token() or cached_token()
    except TokenError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--token-file", type=click.Path(path_type=Path), help="Read the token from this file.")
@click.option("--exec-credential", is_flag=True,
              help="Print a kubectl ExecCredential (the kubeconfig's credential plugin uses this).")
@click.argument("prompt", nargs=-1, required=False)
def token(token_file: Path | None, exec_credential: bool = False, prompt: tuple[str, ...] = ()) -> None:
    """Print the caller's OIDC token: $GUARITA_TOKEN, $GUARITA_TOKEN_FILE / --token-file, a
    client-credentials grant (GUARITA_CLIENT_ID, GUARITA_CLIENT_SECRET, GUARITA_ISSUER), or your
    `bastion login` (refreshed with its refresh token), cached in ~/.cache/guarita/token.json
    until shortly before it expires. Any PROMPT argument is ignored, so it also serves as
    SSH_ASKPASS helper."""
    value = obtain_token(token_file)
    if not value:
        raise click.ClickException(NO_TOKEN)
    _warn_if_expired(value, token_file)
    if exec_credential:
        from bastion.doors.kube.client import exec_credential as credential

        click.echo(json.dumps(credential(value)))
        return
    click.echo(value)


def _warn_if_expired(value: str, token_file: Path | None) -> None:
    """Say so on stderr (kubectl shows a credential plugin's stderr): the gateway will refuse it."""
    import time

    from bastion.doors.kube.client import jwt_expiry

    exp = jwt_expiry(value)
    if exp is None or exp > time.time():
        return
    if token_file is not None:
        where = f"in {token_file}"
    elif os.environ.get("GUARITA_TOKEN"):
        where = "in GUARITA_TOKEN"
    elif os.environ.get("GUARITA_TOKEN_FILE"):
        where = f"in {os.environ['GUARITA_TOKEN_FILE']}"
    else:
        where = "from the client-credentials grant"
    click.echo(f"bastion token: warning: the token {where} expired {time.time() - exp:.0f}s ago; "
               "get a fresh one", err=True)


@main.command()
@click.option("--cluster", help="Cluster name (as in the gateway's [[clusters]]).")
@click.option("--dev", is_flag=True, help="The demo cluster of `bastion serve --dev` (same as --cluster demo).")
@click.option("--server", help="Kubernetes front door, e.g. https://bastion:8443 (default: the --gateway host "
              "and the front door's port).")
@click.option("--gateway", help=f"Gateway HTTP API, to fetch the CA from (default $GUARITA_URL or {DEFAULT_GATEWAY}).")
@click.option("--ca-file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="The front door's CA certificate (PEM), instead of fetching it from the gateway.")
@click.option("--output", "-o", type=click.Path(path_type=Path),
              help="Write (or merge into) this file instead of $KUBECONFIG / ~/.kube/config.")
@click.option("--context", "context_name", help="Name of the context (default guarita-CLUSTER).")
@click.option("--namespace", "-n", help="Default namespace of the context.")
@click.option("--token-file", help="Have the credential plugin read the token from this file.")
@click.option("--exec-command", default="bastion", show_default=True,
              help="Command kubectl runs as credential plugin (words split like a shell).")
@click.option("--no-switch", is_flag=True, help="Do not make it the current context.")
def kubeconfig(cluster: str | None, server: str | None, gateway: str | None, ca_file: Path | None, output: Path | None,
               context_name: str | None, namespace: str | None, token_file: str | None, exec_command: str,
               no_switch: bool, dev: bool = False) -> None:
    """Write a kubeconfig context that reaches CLUSTER through guarita."""
    import shlex
    from urllib.parse import urlsplit

    from bastion.doors.kube.client import build_entries, default_kubeconfig_path, merge_kubeconfig

    if dev:
        from bastion.devmode import DEMO_CLUSTER

        if cluster not in (None, DEMO_CLUSTER):
            raise click.UsageError(f"--dev is the demo cluster {DEMO_CLUSTER!r}: drop --cluster {cluster}")
        cluster = DEMO_CLUSTER
    if not cluster:
        raise click.UsageError("give --cluster NAME (a [[clusters]] name), or --dev for the demo cluster of "
                               "`bastion serve --dev`")

    gateway_url = _gateway_url(gateway)
    kube_port = "8443"
    if ca_file is not None:
        ca_pem = ca_file.read_bytes()
    else:
        try:
            with urllib.request.urlopen(gateway_url + "/v1/kube/ca", timeout=15) as response:
                ca_pem = response.read()
                kube_port = response.headers.get("Guarita-Kube-Port") or kube_port
        except urllib.error.HTTPError as exc:
            raise click.ClickException(f"{gateway_url}/v1/kube/ca: HTTP {exc.code} "
                                       f"{exc.read()[:300].decode(errors='replace')}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise click.ClickException(f"cannot reach the gateway at {gateway_url}: {getattr(exc, 'reason', exc)} "
                                       "(set --gateway, or give the CA with --ca-file)") from None
    if b"BEGIN CERTIFICATE" not in ca_pem:
        raise click.ClickException("the CA is not a PEM certificate")
    if server is None:
        host = urlsplit(gateway_url).hostname or "127.0.0.1"
        server = f"https://{host}:{kube_port}"
    if not server.startswith("https://"):
        raise click.BadParameter("the front door is HTTPS only: https://HOST:PORT", param_hint="--server")
    command = shlex.split(exec_command)
    if not command:
        raise click.BadParameter("empty command", param_hint="--exec-command")
    context = context_name or f"guarita-{cluster}"
    entries = build_entries(cluster, server, ca_pem, command, context, namespace, token_file)
    path = (output or default_kubeconfig_path()).expanduser()
    try:
        merge_kubeconfig(path, entries, switch=not no_switch)
    except (OSError, ValueError) as exc:
        raise click.ClickException(f"cannot write {path}: {exc}") from None
    click.echo(f"context {context} -> {entries['cluster']['cluster']['server']} written to {path}", err=True)


def askpass_main() -> None:
    """SSH_ASKPASS helper: OpenSSH runs it with the prompt as argument; it prints the token."""
    try:
        value = obtain_token()
    except click.ClickException as exc:
        print(f"bastion-askpass: {exc.message}", file=sys.stderr)
        sys.exit(1)
    if not value:
        print("bastion-askpass: no token: set GUARITA_TOKEN or GUARITA_TOKEN_FILE", file=sys.stderr)
        sys.exit(1)
    if len(value) > 1023:
        print("bastion-askpass: warning: the token is longer than 1,023 bytes and OpenSSH will cut it; "
              "use `bastion ssh-cert` instead", file=sys.stderr)
    print(value)


@main.command("ssh-cert")
@click.option("--key", "key_path", type=click.Path(path_type=Path), default=Path("~/.ssh/guarita_ed25519"),
              show_default=True, help="Private key to certify (created if missing).")
@click.option("--token-file", type=click.Path(path_type=Path), help="Read the token from this file.")
@click.option("--ttl", default="1h", show_default=True, help="Requested lifetime (never past the token's).")
@click.option("--gateway", help=f"Gateway HTTP API (default $GUARITA_URL or {DEFAULT_GATEWAY}).")
def ssh_cert(key_path: Path, token_file: Path | None, ttl: str, gateway: str | None) -> None:
    """Exchange your OIDC token for an SSH certificate, so plain `ssh -i KEY` works."""
    import asyncssh

    value = obtain_token(token_file)
    if not value:
        raise click.ClickException(NO_TOKEN)
    key_path = key_path.expanduser()
    if key_path.exists():
        key = asyncssh.read_private_key(str(key_path))
    else:
        key = asyncssh.generate_private_key("ssh-ed25519", comment="guarita")
        write_secret(key_path, key.export_private_key(), replace=True)  # 0600 from the first byte
        key.write_public_key(str(key_path) + ".pub")
    public = key.export_public_key().decode().strip()
    answer = _post(_gateway_url(gateway) + "/v1/ssh/cert", {"public_key": public, "ttl": parse_duration(ttl)}, value)
    cert_path = Path(str(key_path) + "-cert.pub")
    cert_path.write_text(answer["certificate"] + "\n")
    from datetime import datetime

    until = datetime.fromtimestamp(answer["expires_at"]).strftime("%Y-%m-%d %H:%M:%S")
    click.echo(f"certificate for {answer['identity']['subject']} written to {cert_path} (valid until {until})")
    click.echo(f"use it with: ssh -i {key_path} -p 2222 [LOGIN@]TARGET@BASTION", err=True)


@main.command("mask-hash")
@click.argument("detector")
@click.argument("value")
@click.option("--config", "config_path", type=click.Path(path_type=Path), help="The gateway's config (finds the secret).")
@click.option("--secret-file", type=click.Path(path_type=Path), help="The masking secret file itself.")
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("guarita-data"), show_default=True,
              help="The data folder holding the masking secret (without --config).")
def mask_hash(detector: str, value: str, config_path: Path | None, secret_file: Path | None, data_dir: Path) -> None:
    """Keyed hash of VALUE as the masking log records it: compare it with a session's
    `masking` markers to confirm "this CPF was masked in that session"."""
    from bastion.masking.detectors import hmac_value

    config = None
    if config_path is not None:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            _config_problems(exc)
            sys.exit(2)
    if secret_file is None:
        if config is not None:
            if config.masking is None:
                raise click.ClickException(f"{config_path} has no [masking] section")
            secret_file = config.masking.secret_file
        else:
            secret_file = data_dir / "masking.key"
    if not secret_file.exists():
        raise click.ClickException(f"no masking secret at {secret_file} (pass --config or --secret-file)")
    from bastion.masking.config import BUILTIN_NAMES, load_or_create_secret

    known = set(BUILTIN_NAMES) | ({c.name for c in config.masking.custom} if config and config.masking else set())
    if detector not in known:
        raise click.ClickException(f"unknown detector {detector!r} (known: {', '.join(sorted(known))})")
    try:
        click.echo(hmac_value(load_or_create_secret(secret_file), detector, value))
    except (ValueError, KeyError) as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("guarita-data"), show_default=True,
              help="The data folder holding the keys (without --config).")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="The gateway's config file (finds its keys).")
def keys(data_dir: Path, config_path: Path | None) -> None:
    """Print the public keys an auditor or a target needs: recording key, user CA, target CA."""
    from bastion.identity.usercert import load_or_create_key
    from recorder import RecordingKey

    if config_path:
        try:
            config = load_config(config_path)
        except ConfigError as exc:
            _config_problems(exc)
            sys.exit(2)
        paths = (config.recording.key_file, config.user_ca_key, config.target_ca_key)
    else:
        paths = (data_dir / "recording_key.pem", data_dir / "user_ca_key", data_dir / "target_ca_key")
    rec = RecordingKey.load_or_create(paths[0])
    click.echo(f"# recording key ({rec.key_id}): give it to `replay verify --public-key`")
    click.echo(rec.public_pem().strip())
    click.echo("# target CA: put this line in the targets' TrustedUserCAKeys file")
    click.echo(load_or_create_key(paths[2]).export_public_key().decode().strip())
    click.echo("# user CA (signs agents' certificates from `bastion ssh-cert`)")
    click.echo(load_or_create_key(paths[1]).export_public_key().decode().strip())


# -- approvals ---------------------------------------------------------------------------


def _api(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> Any:
    """One authenticated call to the gateway's HTTP API; errors become one clear line."""
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers={"Authorization": f"Bearer {token}"})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            answer = json.loads(exc.read())
            detail = f"{answer.get('message', '')} ({answer.get('error', exc.code)})"
        except ValueError:
            detail = str(exc.reason)
        raise click.ClickException(f"refused, HTTP {exc.code}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach the gateway at {url}: {reason} "
                                   "(is `bastion serve` running? set --gateway or GUARITA_URL)") from None


def _approver_token(token_file: Path | None) -> str:
    value = obtain_token(token_file)
    if not value:
        raise click.ClickException("no token: run `bastion login`, or set GUARITA_TOKEN, or GUARITA_TOKEN_FILE / "
                                   "--token-file (your own OIDC token: decisions are made in your name)")
    return value


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    from datetime import datetime

    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _show_request(r: dict[str, Any]) -> None:
    requester = r["requester"].get("email") or r["requester"].get("subject")
    where = f"{r['login']}@{r['target']}" if r.get("login") else r.get("target")
    if r.get("namespace"):
        where = f"{where} namespace {r['namespace']}" + (f" pod {r['pod']}" if r.get("pod") else "")
    lines = [
        f"request    {r['id']}  ({r['status']}" + (f": {r['status_reason']}" if r.get("status_reason") else "") + ")",
        f"requester  {requester}  ({r['requester'].get('issuer')})",
        f"where      {where} via {r['front_door']} ({r['kind']}), session {r['session']}",
        f"command    {r['command']}",
        f"rule       {r['rule']}" + (f": {r['message']}" if r.get("message") else ""),
        f"approvers  {', '.join(r['approvers'])} ({r['min_approvals']} needed)",
        f"created    {_when(r['created'])}   expires {_when(r['expires'])}   decided {_when(r.get('decided'))}",
    ]
    for d in r["decisions"]:
        who = d["approver"].get("email") or d["approver"].get("subject")
        lines.append(f"decision   {d['decision']} by {who} at {_when(d['created'])}: {d['reason']}")
    click.echo("\n".join(lines))


_gateway_option = click.option("--gateway", help=f"Gateway HTTP API (default $GUARITA_URL or {DEFAULT_GATEWAY}).")
_token_file_option = click.option("--token-file", type=click.Path(path_type=Path),
                                  help="Read your token from this file (default $GUARITA_TOKEN / $GUARITA_TOKEN_FILE).")


@main.group()
def approvals() -> None:
    """List, show, approve and deny commands that wait for approval (with your own token)."""


@approvals.command("list")
@click.option("--status", default="pending", show_default=True, help="Requests in this state.",
              type=click.Choice(["pending", "approved", "denied", "expired", "cancelled", "all"]))
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_gateway_option
@_token_file_option
def approvals_list(status: str, as_json: bool, gateway: str | None, token_file: Path | None) -> None:
    """Requests you may decide on (or made yourself)."""
    answer = _api("GET", f"{_gateway_url(gateway)}/v1/approvals?status={status}", _approver_token(token_file))
    rows = answer["approvals"]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no {'' if status == 'all' else status + ' '}approval requests", err=True)
        return
    import time as _time

    now = _time.time()
    table = [("ID", "STATUS", "REQUESTER", "TARGET", "APPROVERS", "COMMAND")]
    for r in rows:
        requester = r["requester"].get("email") or r["requester"].get("subject")
        left = f"{max(0, int(r['expires'] - now))}s left" if r["status"] == "pending" else r["status"]
        command = r["command"].replace("\n", " ⏎ ")
        command = command if len(command) <= 60 else command[:57] + "..."
        table.append((r["id"], left, str(requester), r.get("target") or "-", ", ".join(r["approvers"]) or "-",
                      command))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)) + "  " + row[-1])


@approvals.command("show")
@click.argument("request_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@_gateway_option
@_token_file_option
def approvals_show(request_id: str, as_json: bool, gateway: str | None, token_file: Path | None) -> None:
    """Everything about one request."""
    r = _api("GET", f"{_gateway_url(gateway)}/v1/approvals/{request_id}", _approver_token(token_file))
    if as_json:
        click.echo(json.dumps(r, indent=2))
    else:
        _show_request(r)


def _decide_command(decision: str) -> Any:
    @click.argument("request_id")
    @click.option("--reason", required=True, help="Why: kept with the decision, shown to the requester and auditors.")
    @_gateway_option
    @_token_file_option
    def command(request_id: str, reason: str, gateway: str | None, token_file: Path | None) -> None:
        url = f"{_gateway_url(gateway)}/v1/approvals/{request_id}/{decision}"
        r = _api("POST", url, _approver_token(token_file), {"reason": reason})
        click.echo(f"request {r['id']}: {decision} recorded; status {r['status']}"
                   + (f" ({sum(d['decision'] == 'approve' for d in r['decisions'])} of {r['min_approvals']} "
                      "approvals)" if r["status"] == "pending" else ""))

    command.__doc__ = ("Approve a request: the held command runs once enough approvers agreed." if decision == "approve"
                       else "Deny a request: the held command does not run, and the requester sees your reason.")
    return command


approvals.command("approve")(_decide_command("approve"))
approvals.command("deny")(_decide_command("deny"))


# login / logout / whoami, lock / unlock, sessions (bastion/cli_identity.py)
def _register_identity_commands() -> None:
    from bastion import cli_identity

    cli_identity.register(main, sys.modules[__name__])


_register_identity_commands()


# demo: the tour of `bastion serve --dev`, run for you (bastion/cli_demo.py)
def _register_demo_command() -> None:
    from bastion import cli_demo

    cli_demo.register(main)


_register_demo_command()


if __name__ == "__main__":
    main()
