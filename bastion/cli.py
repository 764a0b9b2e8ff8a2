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

from bastion.config import ConfigError, load_config, parse_duration, parse_listen

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    logging.getLogger("asyncssh").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
@click.option("-v", "--verbose", is_flag=True)
def serve(config_path: Path | None, dev: bool, data_dir: Path | None, recordings: str | None,
          ssh_listen: str | None, http_listen: str | None, audit_log: str | None, verbose: bool) -> None:
    """Run the gateway."""
    from bastion.gateway import Gateway, dev_config

    _setup_logging(verbose)
    if bool(config_path) == dev:
        raise click.UsageError("give either --config FILE or --dev")
    try:
        if dev:
            ssh = parse_listen(ssh_listen or "127.0.0.1:2222")
            http = parse_listen(http_listen or "127.0.0.1:8080")
            config = dev_config(data_dir or Path("guarita-data"), ssh_port=ssh[1], http_port=http[1],
                                recordings=recordings, audit_log=audit_log)
        else:
            assert config_path is not None
            config = load_config(config_path, overrides={"data_dir": data_dir, "recordings": recordings})
            if ssh_listen:
                config = replace(config, ssh_listen=parse_listen(ssh_listen))
            if http_listen:
                config = replace(config, http_listen=parse_listen(http_listen))
            if audit_log:
                config = replace(config, audit_log=audit_log)
    except ConfigError as exc:
        _config_problems(exc)
        sys.exit(2)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    asyncio.run(_serve(Gateway, config))


async def _serve(gateway_cls: Any, config: Any) -> None:
    try:
        gw = gateway_cls(config)
        await gw.start()
    except (OSError, RuntimeError, ValueError) as exc:
        click.echo(f"guarita: cannot start: {exc}", err=True)
        sys.exit(1)
    _print_welcome(gw)
    await gw.run_forever()


def _print_welcome(gw: Any) -> None:
    c = gw.config
    ssh_host = c.ssh_listen[0] if c.ssh_listen[0] not in ("0.0.0.0", "::") else "127.0.0.1"
    port = gw.ssh_port
    http = f"http://{c.http_listen[0]}:{gw.http_port}"
    fp = gw.host_key.get_fingerprint()
    lines = [f"guarita is listening: SSH {ssh_host}:{port}, HTTP API {http}  (host key {fp})",
             f"recordings: {gw.store.url}" + ("" if gw.store.write_once else "  (local folder: not write-once)")]
    if c.dev:
        gw_flag = "" if gw.http_port == 8080 else f" --gateway {http}"
        ssh = f"ssh -p {port} -o StrictHostKeyChecking=accept-new"
        lines += [
            "",
            "Development mode: a local token issuer and a demo target named 'demo' that runs a real shell.",
            "In another terminal:",
            f"  export GUARITA_TOKEN=$(bastion dev-token --sub alice --group sre{gw_flag})",
            "  export SSH_ASKPASS=$(command -v bastion-askpass) SSH_ASKPASS_REQUIRE=force",
            f"  {ssh} demo@{ssh_host} 'uname -a'          # run a command",
            f"  {ssh} -t demo@{ssh_host}                   # open a shell",
            "Or paste the token at the 'Token:' prompt, or get a certificate once and use plain ssh:",
            f"  bastion ssh-cert{gw_flag} && {ssh} -i ~/.ssh/guarita_ed25519 demo@{ssh_host}",
            "Then see what happened:",
            f"  replay ls --data-dir {c.data_dir}",
            f"  replay cat ID --data-dir {c.data_dir}",
        ]
    click.echo("\n".join(lines), err=True)


def _config_problems(exc: ConfigError) -> None:
    click.echo("guarita: the configuration has problems:", err=True)
    for key, message in exc.problems:
        click.echo(f"  {key}: {message}", err=True)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
def check_config(config_path: Path) -> None:
    """Validate a config file; print every problem with the key that has it."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _config_problems(exc)
        sys.exit(2)
    click.echo(f"{config_path}: OK ({len(config.issuers)} issuer(s), {len(config.targets)} target(s), "
               f"{len(config.access)} access rule(s); recordings to {config.recording.url})")


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
@click.option("--sub", required=True, help="Subject of the token.")
@click.option("--group", "groups", multiple=True, help="A group (repeatable).")
@click.option("--email")
@click.option("--ttl", default="1h", show_default=True, help="Lifetime, e.g. 10m, 1h.")
@click.option("--claim", "claims", multiple=True, help="Extra claim NAME=VALUE (repeatable).")
@click.option("--gateway", help=f"Gateway HTTP API (default $GUARITA_URL or {DEFAULT_GATEWAY}).")
def dev_token(sub: str, groups: tuple[str, ...], email: str | None, ttl: str, claims: tuple[str, ...],
              gateway: str | None) -> None:
    """Mint a token from the --dev gateway's local issuer and print it."""
    extra = dict(c.split("=", 1) for c in claims if "=" in c)
    try:
        seconds = parse_duration(ttl)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--ttl") from None
    body = {"sub": sub, "groups": list(groups), "email": email, "ttl": seconds, "claims": extra}
    click.echo(_post(_gateway_url(gateway) + "/dev/token", body)["token"])


@main.command()
@click.option("--token-file", type=click.Path(path_type=Path), help="Read the token from this file.")
def token(token_file: Path | None) -> None:
    """Print the caller's OIDC token ($GUARITA_TOKEN or $GUARITA_TOKEN_FILE)."""
    value = read_token(token_file)
    if not value:
        raise click.ClickException("no token: set GUARITA_TOKEN, or GUARITA_TOKEN_FILE / --token-file")
    click.echo(value)


def askpass_main() -> None:
    """SSH_ASKPASS helper: OpenSSH runs it with the prompt as argument; it prints the token."""
    try:
        value = read_token()
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

    value = read_token(token_file)
    if not value:
        raise click.ClickException("no token: set GUARITA_TOKEN, or GUARITA_TOKEN_FILE / --token-file")
    key_path = key_path.expanduser()
    if key_path.exists():
        key = asyncssh.read_private_key(str(key_path))
    else:
        key = asyncssh.generate_private_key("ssh-ed25519", comment="guarita")
        key_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        key.write_private_key(str(key_path))
        os.chmod(key_path, 0o600)
        key.write_public_key(str(key_path) + ".pub")
    public = key.export_public_key().decode().strip()
    answer = _post(_gateway_url(gateway) + "/v1/ssh/cert", {"public_key": public, "ttl": parse_duration(ttl)}, value)
    cert_path = Path(str(key_path) + "-cert.pub")
    cert_path.write_text(answer["certificate"] + "\n")
    from datetime import datetime

    until = datetime.fromtimestamp(answer["expires_at"]).strftime("%Y-%m-%d %H:%M:%S")
    click.echo(f"certificate for {answer['identity']['subject']} written to {cert_path} (valid until {until})")
    click.echo(f"use it with: ssh -i {key_path} -p 2222 [LOGIN@]TARGET@BASTION", err=True)


@main.command()
@click.option("--data-dir", type=click.Path(path_type=Path), default=Path("guarita-data"), show_default=True)
@click.option("--config", "config_path", type=click.Path(path_type=Path))
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


if __name__ == "__main__":
    main()
