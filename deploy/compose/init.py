"""One-shot set-up for deploy/compose.yaml (the guarita-init service).

1. With --run-as, hands the shared volumes to the guarita user and drops root (the only
   reason it starts as root: a fresh named volume belongs to root).
2. Checks the config (``bastion check-config --skip-files``: the files it names are made
   next): a broken file stops here, with every problem listed, instead of in a restart
   loop of the gateway. Once they are made, ``check-config`` checks them too.
3. Makes a self-signed TLS certificate for the HTTP API (gateway.tls_cert / tls_key) if
   there is none yet. Production: mount a real certificate instead.
4. Creates the gateway's keys if missing and prints their public halves (``bastion keys``:
   the recording key for auditors, the target CA for targets, the user CA), and writes the
   target CA line to --target-ca-out, where the demo target's sshd reads it
   (TrustedUserCAKeys). On real targets, put that line there with your configuration
   management.

Idempotent: a second run keeps every existing key and certificate.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import subprocess
import sys
import tomllib
from pathlib import Path


def drop_root(run_as: str, paths: list[Path]) -> None:
    """As root: give ``paths`` to UID:GID, then become UID:GID for good."""
    if os.getuid() != 0:
        return
    uid, _, gid = run_as.partition(":")
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        os.chown(path, int(uid), int(gid or uid))
    os.setgroups([])
    os.setgid(int(gid or uid))
    os.setuid(int(uid))


def self_signed(cert_path: Path, key_path: Path, names: list[str]) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=365))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def target_ca_line(keys_output: str) -> str:
    """The line after ``# target CA...`` in ``bastion keys`` output."""
    lines = keys_output.splitlines()
    for i, line in enumerate(lines[:-1]):
        if line.startswith("#") and "target CA" in line:
            return lines[i + 1].strip()
    raise SystemExit(f"guarita-init: no target CA in `bastion keys` output:\n{keys_output}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--target-ca-out", type=Path, required=True)
    parser.add_argument("--run-as", metavar="UID:GID",
                        help="when started as root: hand the data and output folders to UID:GID and drop root")
    parser.add_argument("--bastion", default="bastion", help="the bastion command (default: bastion on PATH)")
    parser.add_argument("--tls-name", action="append", default=[],
                        help="extra DNS name or IP for the self-signed certificate (repeatable)")
    args = parser.parse_args(argv)

    raw = tomllib.loads(args.config.read_text())
    gateway = raw.get("gateway", {})
    base = args.config.resolve().parent

    def path(value: str) -> Path:
        p = Path(value)
        return p if p.is_absolute() else base / p

    data_dir = path(gateway.get("data_dir", "guarita-data"))
    if args.run_as:
        drop_root(args.run_as, [data_dir, args.target_ca_out.parent])

    bastion = args.bastion.split()
    check = subprocess.run([*bastion, "check-config", "--skip-files", str(args.config)], capture_output=True,
                           text=True)
    sys.stderr.write(check.stderr)
    if check.returncode != 0:
        return check.returncode
    print(check.stdout.strip())

    if gateway.get("tls_cert") and gateway.get("tls_key"):
        cert, key = path(gateway["tls_cert"]), path(gateway["tls_key"])
        if not (cert.exists() and key.exists()):
            names = ["localhost", "127.0.0.1", "::1", "gateway", "guarita", *args.tls_name]
            self_signed(cert, key, names)
            print(f"wrote a self-signed TLS certificate for {', '.join(names)} to {cert}")

    keys = subprocess.run([*bastion, "keys", "--config", str(args.config)], capture_output=True, text=True)
    sys.stderr.write(keys.stderr)
    if keys.returncode != 0:
        return keys.returncode
    print(keys.stdout.strip())
    line = target_ca_line(keys.stdout)
    args.target_ca_out.parent.mkdir(parents=True, exist_ok=True)
    args.target_ca_out.write_text(line + "\n")
    os.chmod(args.target_ca_out, 0o644)
    print(f"wrote the target CA to {args.target_ca_out}")
    files = subprocess.run([*bastion, "check-config", str(args.config)], capture_output=True, text=True)
    sys.stderr.write(files.stderr)
    return files.returncode


if __name__ == "__main__":
    sys.exit(main())
