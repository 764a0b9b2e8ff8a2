"""``bastion check-config`` and ``serve`` name the key of a file the config points at that is
missing or unreadable (real CLI processes)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import BASTION, free_port


def _config(tmp_path: Path, gateway_extra: str = "", target_key: Path | None = None,
            kubeconfig: Path | None = None) -> Path:
    data = tmp_path / "data"
    lines = ["[gateway]", f'data_dir = "{data}"', gateway_extra, "",
             "[[oidc]]", 'issuer = "http://127.0.0.1:9/nowhere"', 'audience = "guarita"', ""]
    if target_key is not None:
        lines += ["[[targets]]", 'name = "web"', 'host = "127.0.0.1"', "port = 22", 'logins = ["deploy"]',
                  'host_keys = ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJdD7y3aLq454yWBdwLWbieU1ebz9/cu7/QEXn9OIeZJ"]',
                  'credential = "key"', f'private_key = "{target_key}"', ""]
    if kubeconfig is not None:
        lines += ["[[clusters]]", 'name = "prod"', f'kubeconfig = "{kubeconfig}"', ""]
    path = tmp_path / "guarita.toml"
    path.write_text("\n".join(lines))
    return path


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BASTION, *args], capture_output=True, text=True, timeout=60)


CASES = {
    "tls-cert-missing": ("gateway.tls_cert", "does not exist"),
    "tls-key-folder": ("gateway.tls_key", "is a folder"),
    "tls-pair-garbage": ("gateway.tls_cert", "not a usable certificate and key pair"),
    "target-key-missing": ("targets[0].private_key", "does not exist"),
    "kubeconfig-missing": ("clusters[0].kubeconfig", "does not exist"),
    "data-dir-is-a-file": ("gateway.data_dir", "is a file, not a folder"),
}


def _case_config(case: str, tmp_path: Path) -> Path:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    tls = f'tls_cert = "{cert}"\ntls_key = "{key}"'
    if case == "tls-cert-missing":
        key.write_text("x")
        return _config(tmp_path, tls)
    if case == "tls-key-folder":
        cert.write_text("x")
        key.mkdir()
        return _config(tmp_path, tls)
    if case == "tls-pair-garbage":
        cert.write_text("not a certificate")
        key.write_text("not a key")
        return _config(tmp_path, tls)
    if case == "target-key-missing":
        return _config(tmp_path, target_key=tmp_path / "nope" / "id_ed25519")
    if case == "kubeconfig-missing":
        return _config(tmp_path, kubeconfig=tmp_path / "kubeconfig")
    (tmp_path / "data").write_text("a file where the data dir should be")
    return _config(tmp_path)


@pytest.mark.parametrize("case", sorted(CASES))
def test_check_config_and_serve_name_the_key_of_a_bad_file(case: str, tmp_path: Path) -> None:
    key, words = CASES[case]
    path = _case_config(case, tmp_path)
    checked = _run("check-config", str(path))
    assert checked.returncode == 2, checked.stdout + checked.stderr
    line = next((line for line in checked.stderr.splitlines() if line.strip().startswith(key + ":")), None)
    assert line is not None and words in line, checked.stderr
    assert "Traceback" not in checked.stderr
    # serve refuses the same way, before it creates anything.
    served = _run("serve", "--config", str(path), "--ssh-listen", f"127.0.0.1:{free_port()}",
                  "--http-listen", f"127.0.0.1:{free_port()}")
    assert served.returncode == 2, served.stderr
    assert f"{key}:" in served.stderr and words in served.stderr and "Traceback" not in served.stderr
    # --skip-files checks keys and values only (parse_config itself already wants the files a
    # target or a cluster names).
    if not case.startswith(("target", "kubeconfig")):
        assert _run("check-config", "--skip-files", str(path)).returncode == 0


def test_good_tls_pair_passes(tmp_path: Path) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    path = _config(tmp_path, f'tls_cert = "{tmp_path / "cert.pem"}"\ntls_key = "{tmp_path / "key.pem"}"')
    checked = _run("check-config", str(path))
    assert checked.returncode == 0 and "OK" in checked.stdout, checked.stderr
