"""deploy/: the container image, the compose stack, the Helm chart and the systemd unit.

Checked with the real tools wherever one installs here (``bash deploy/tools/install-deploy-tools``,
which ``.ci/install-deps`` runs): hadolint for the Dockerfiles, helm (lint, template) and
kubernetes-validate (the Kubernetes JSON schemas, strict) for the chart, check-jsonschema
(the compose-spec schema) for the compose file, ``systemd-analyze verify`` / ``security``
for the unit, OpenSSH's ``sshd -t`` for the demo target, ``bastion check-config`` for every
config the artifacts carry or render, and the image's own install script, run for real.
What no tool here can check (``docker compose config`` without the compose plugin, no
Docker daemon to build or run images) is checked structurally, and the cross-file
wiring (passwords, bucket, issuer, ports, host keys) is checked between the files.

A missing tool skips its tests with the reason, except under CI (``CI`` set), where it
fails them: CI installs every tool, so a skip there would hide a broken install step.
"""

from __future__ import annotations

import base64
import http.client
import importlib.util
import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CHART = DEPLOY / "helm" / "guarita"
COMPOSE = DEPLOY / "compose.yaml"
COMPOSE_CONFIG = DEPLOY / "compose" / "guarita.toml"
UNIT = DEPLOY / "systemd" / "guarita.service"
BASTION = [sys.executable, "-m", "bastion.cli"]
TOOLS_BIN = Path(os.environ.get("GUARITA_TOOLS_DIR", Path.home() / ".cache" / "guarita-tools")) / "bin"
INSTALL_HINT = "run `bash deploy/tools/install-deploy-tools` (.ci/install-deps does)"
# Kubernetes versions the chart is validated against: its kubeVersion floor and the newest.
KUBE_VERSIONS = ("1.25", "1.37")


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        pytest.fail(f"{shlex.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def missing(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs it: the install step is broken)")
    pytest.skip(reason)


def tool(name: str) -> str:
    """Path of a deploy tool: the tools folder first, then PATH."""
    candidate = TOOLS_BIN / name
    if candidate.exists() and os.access(candidate, os.X_OK):
        return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    if name == "helm" and platform.machine() != "x86_64":
        pytest.skip(f"helm: the registries reachable here ship it for x86_64 only, not {platform.machine()}")
    missing(f"{name} is not installed: {INSTALL_HINT}")
    raise AssertionError("unreachable")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- Dockerfile ----------------------------------------------------------------------------


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(instructions: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions:
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "compose/target/Dockerfile"])
def test_dockerfiles_pass_hadolint(dockerfile: str) -> None:
    hadolint = tool("hadolint")
    proc = run([hadolint, "--failure-threshold", "info", str(DEPLOY / dockerfile)], check=False)
    assert proc.returncode == 0, f"hadolint findings in deploy/{dockerfile}:\n{proc.stdout}{proc.stderr}"


def test_dockerfile_is_multi_stage_small_and_unprivileged() -> None:
    ins = dockerfile_instructions(DEPLOY / "Dockerfile")
    args = {rest.split("=", 1)[0]: rest.split("=", 1)[1] for word, rest in ins if word == "ARG" and "=" in rest}
    base = args["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11-slim(-\w+)?(@sha256:[0-9a-f]{64})?", base), base
    parts = stages(ins)
    assert len(parts) >= 2, "multi-stage: a build stage and a final stage"
    final = parts[-1]
    assert final[0] == ("FROM", "${PYTHON_IMAGE}"), "the final stage is python:3.11-slim"
    final_text = "\n".join(f"{w} {r}" for w, r in final)
    for build_tool in ("gcc", "build-essential", "apt-get install", "pip install", "make ", "git "):
        assert build_tool not in final_text, f"build tooling in the final stage: {build_tool!r}"
    copies = [r for w, r in final if w == "COPY"]
    assert copies and all(c.startswith("--from=build ") for c in copies), "the final stage copies only the built venv"
    users = [r for w, r in final if w == "USER"]
    assert users and users[-1].split(":")[0] == "10001", "runs as uid 10001"
    user_at = max(i for i, (w, _) in enumerate(final) if w == "USER")
    entry_at = next(i for i, (w, _) in enumerate(final) if w == "ENTRYPOINT")
    assert user_at < entry_at, "USER comes before the entrypoint"
    assert "useradd" in final_text and "--uid 10001" in final_text and " guarita" in final_text
    single = {w: r for w, r in final if w in ("ENTRYPOINT", "CMD", "EXPOSE", "VOLUME", "HEALTHCHECK", "STOPSIGNAL")}
    assert json.loads(single["ENTRYPOINT"]) == ["bastion"]
    assert json.loads(single["CMD"]) == ["serve", "--config", "/etc/guarita/guarita.toml"]
    assert set(single["EXPOSE"].split()) == {"2222", "8443", "8080"}
    assert json.loads(single["VOLUME"]) == ["/var/lib/guarita"]
    assert single["STOPSIGNAL"] == "SIGTERM"
    assert "GUARITA_HEALTH_URL" in single["HEALTHCHECK"] and "urllib" in single["HEALTHCHECK"]
    for word, rest in ins:
        assert not (word == "ADD" and "://" in rest), "no ADD of URLs"
    # The dependency layer is built from the lock alone, before any source is copied (so
    # it is cached across code changes), and only from the hash-pinned lock, wheels only.
    build = parts[0]
    deps_at = next(i for i, (w, r) in enumerate(build) if w == "RUN" and "install.sh deps" in r)
    app_at = next(i for i, (w, r) in enumerate(build) if w == "RUN" and "install.sh app" in r)
    first_source = next(i for i, (w, r) in enumerate(build) if w == "COPY" and r.split()[0] in ("bastion", "pyproject.toml"))
    assert deps_at < first_source < app_at
    install = (DEPLOY / "docker" / "install.sh").read_text()
    assert "--require-hashes" in install and "--only-binary=:all:" in install and "requirements.lock" in install


def test_dockerignore_lets_through_exactly_what_the_dockerfile_copies() -> None:
    ignore = [line.strip() for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "*", "deny by default"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    ins = dockerfile_instructions(DEPLOY / "Dockerfile")
    sources = []
    for word, rest in ins:
        if word == "COPY" and not rest.startswith("--from"):
            sources += [s for s in rest.split()[:-1] if not s.startswith("--")]
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert source.rstrip("/") in allowed, f"COPY {source} is excluded by deploy/Dockerfile.dockerignore"


def test_image_healthcheck_command_passes_on_a_tls_gateway_and_fails_when_down(tmp_path: Path) -> None:
    """The image's HEALTHCHECK, run against a real gateway with the compose config's TLS
    set-up (certificate from compose/init.py), and against a closed port."""
    ins = dict(dockerfile_instructions(DEPLOY / "Dockerfile"))
    healthcheck = json.loads(ins["HEALTHCHECK"].split(" CMD ", 1)[1])
    assert healthcheck[:2] == ["python", "-c"]
    with compose_gateway(tmp_path) as http_port:
        env = {**os.environ, "GUARITA_HEALTH_URL": f"https://127.0.0.1:{http_port}/healthz"}
        ok = run([sys.executable, "-c", healthcheck[2]], env=env, check=False)
        assert ok.returncode == 0, ok.stderr
    env = {**os.environ, "GUARITA_HEALTH_URL": f"https://127.0.0.1:{free_port()}/healthz"}
    down = run([sys.executable, "-c", healthcheck[2]], env=env, check=False)
    assert down.returncode != 0


# -- the lock file and the image's virtualenv ---------------------------------------------------


def lock_pins(lock: str = "requirements.lock") -> dict[str, tuple[str, int]]:
    """name -> (version, number of hashes) from deploy/requirements.lock (or another lock)."""
    pins: dict[str, tuple[str, int]] = {}
    current = None
    for line in (DEPLOY / lock).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)", line)
        if match:
            current = re.sub(r"[-_.]+", "-", match.group(1)).lower()
            pins[current] = (match.group(2), 0)
        elif current and "--hash=sha256:" in line:
            version, count = pins[current]
            pins[current] = (version, count + 1)
    return pins


def test_lock_pins_every_runtime_dependency_with_hashes() -> None:
    from packaging.requirements import Requirement

    pins = lock_pins()
    assert pins, "deploy/requirements.lock is empty"
    unhashed = [name for name, (_, hashes) in pins.items() if hashes == 0]
    assert not unhashed, f"pins without hashes (the image installs with --require-hashes): {unhashed}"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    stale = []
    for spec in project["dependencies"]:
        req = Requirement(spec)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        if name not in pins:
            stale.append(f"{spec}: not in the lock")
        elif pins[name][0] not in req.specifier:
            stale.append(f"{spec}: the lock pins {pins[name][0]}")
    assert not stale, "deploy/requirements.lock is out of date with pyproject.toml; regenerate it with " \
                      "`bash deploy/lock.sh`:\n  " + "\n  ".join(stale)


def test_the_test_lock_pins_the_test_extra_and_agrees_with_the_runtime_lock() -> None:
    """`make test` installs with deploy/requirements-test.lock as constraints: it must pin every
    test dependency, and every runtime package at the version the image gets."""
    from packaging.requirements import Requirement

    runtime, test = lock_pins(), lock_pins("requirements-test.lock")
    differ = {name: (version, test.get(name, ("missing", 0))[0]) for name, (version, _) in runtime.items()
              if test.get(name, ("missing", 0))[0] != version}
    assert not differ, f"runtime lock vs test lock (regenerate both with `bash deploy/lock.sh`): {differ}"
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    missing = [spec for spec in extras if re.sub(r"[-_.]+", "-", Requirement(spec).name).lower() not in test]
    assert not missing, f"test dependencies not pinned in deploy/requirements-test.lock: {missing}"


# A venv built from the lock (and the masking engine compiled) takes minutes on a loaded 2-core
# machine: the suite's 120 s per-test limit is for hangs, and this is not one.
@pytest.mark.timeout(600)
def test_image_install_script_builds_a_venv_that_runs_every_module(tmp_path: Path) -> None:
    """deploy/docker/install.sh, exactly as the image build runs it (same files copied, no
    machine-local pip settings): the lock installs with --require-hashes and wheels only,
    `pip check` passes, and every module of the product imports in that venv alone."""
    src = tmp_path / "src"
    for name in ("pyproject.toml", "setup.py", "README.md", "bastion", "recorder", "replay", "deploy/requirements.lock",
                 "deploy/docker/install.sh"):
        source, dest = ROOT / name, src / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, dest, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(source, dest)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull
    venv = tmp_path / "venv"
    for step in ("deps", "app"):
        run(["sh", str(src / "deploy/docker/install.sh"), step, str(venv), str(src)], env=env, timeout=600)
    assert not (venv / "bin" / "pip").exists(), "pip is removed from the image's venv"
    imports = (
        "import importlib, pkgutil\n"
        "import bastion, recorder, replay\n"
        "for pkg in (bastion, recorder, replay):\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(m.name)\n"
        "print('ok')\n"
    )
    proc = run([str(venv / "bin" / "python"), "-c", imports], cwd=tmp_path, env=env)
    assert proc.stdout.strip() == "ok"
    # This machine has gcc and OpenSSL's headers (.ci/install-deps): the engine is built.
    proc = run([str(venv / "bin" / "python"), "-c", "from bastion.masking import engine; print(engine.ENABLED)"],
               cwd=tmp_path, env=env)
    assert proc.stdout.strip() == "True"
    run([str(venv / "bin" / "bastion"), "check-config", "--skip-files", str(COMPOSE_CONFIG)], cwd=tmp_path, env=env)
    run([str(venv / "bin" / "replay"), "--help"], cwd=tmp_path, env=env)


# -- compose ----------------------------------------------------------------------------


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def test_compose_file_validates_against_the_compose_spec() -> None:
    checker = tool("check-jsonschema")
    run([checker, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)])


def test_compose_config_with_docker_compose() -> None:
    docker = shutil.which("docker")
    if not docker or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed, and no registry reachable here ships it; "
                    "the compose-spec schema and the structural tests check the file instead")
    run([docker, "compose", "-f", str(COMPOSE), "config", "--quiet"])


def test_compose_services_images_and_init_containers() -> None:
    doc = compose()
    services = doc["services"]
    assert {"gateway", "postgres", "minio", "minio-init", "keycloak", "target", "guarita-init"} <= set(services)
    for name, svc in services.items():
        image = svc.get("image", "")
        assert image and ":" in image.rsplit("/", 1)[-1], f"{name}: pin the image tag ({image!r})"
        assert not image.endswith(":latest"), f"{name}: no :latest"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: publish {port} on 127.0.0.1 only (demo secrets)"
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: mounts missing file {source}"
    assert services["postgres"]["image"].startswith("postgres:16")
    assert services["gateway"]["build"]["dockerfile"] == "deploy/Dockerfile"
    assert (DEPLOY / services["gateway"]["build"]["context"] / "deploy/Dockerfile").exists()
    assert services["target"]["build"]["context"] == "./compose/target"
    # `docker compose up --wait` succeeds only if every one-shot container is awaited by a
    # long-running service with service_completed_successfully.
    one_shot = {n for n, s in services.items() if s.get("restart") == "no"}
    assert one_shot == {"guarita-init", "minio-init"}
    adopted = {dep for s in services.values() if s.get("restart") != "no"
               for dep, cond in (s.get("depends_on") or {}).items()
               if isinstance(cond, dict) and cond.get("condition") == "service_completed_successfully"}
    assert one_shot <= adopted
    gw_deps = services["gateway"]["depends_on"]
    assert gw_deps["postgres"]["condition"] == "service_healthy"
    assert gw_deps["guarita-init"]["condition"] == "service_completed_successfully"
    assert services["gateway"]["stop_signal"] == "SIGTERM"
    # --wait waits for these to be healthy (the gateway's healthcheck is the image's).
    for name in ("postgres", "keycloak"):
        assert "healthcheck" in services[name], f"{name}: a healthcheck for --wait"
    # Compose interpolates $VAR in the file: a shell variable must be written $$VAR.
    for name, svc in services.items():
        for key in ("command", "entrypoint"):
            for part in svc.get(key) or []:
                assert not re.search(r"(?<!\$)\$(?!\$)", part.replace("$$", "")), f"{name}.{key}: write $ as $$"
        for part in (svc.get("healthcheck") or {}).get("test", []):
            assert "$" not in part.replace("$$", ""), f"{name}.healthcheck: write $ as $$"
    # The one-shot scripts are valid sh once compose has turned $$ into $.
    script = services["minio-init"]["command"][0].replace("$$", "$")
    run(["sh", "-n", "-c", script])


def test_compose_files_agree_with_each_other() -> None:
    """The passwords, bucket, issuer, ports and keys that one file names and another uses."""
    services = compose()["services"]
    config = tomllib.loads(COMPOSE_CONFIG.read_text())
    gw_env = service_env(services["gateway"])
    # Object store: endpoint, bucket with Object Lock, the gateway's user and its policy.
    mc_script = services["minio-init"]["command"][0]
    assert gw_env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000"
    bucket = re.search(r"mc mb .*--with-lock local/(\S+)", mc_script).group(1)  # type: ignore[union-attr]
    assert config["recording"]["url"].startswith(f"s3://{bucket}/")
    assert f"mc admin user add local {gw_env['AWS_ACCESS_KEY_ID']} {gw_env['AWS_SECRET_ACCESS_KEY']}" in mc_script
    minio_env = service_env(services["minio"])
    assert f"{minio_env['MINIO_ROOT_USER']} {minio_env['MINIO_ROOT_PASSWORD']}" in mc_script
    policy = json.loads((DEPLOY / "compose" / "minio-policy.json").read_text())
    resources = {r for st in policy["Statement"] for r in st["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}
    actions = {a for st in policy["Statement"] for a in st["Action"]}
    assert not any("Delete" in a for a in actions), "the gateway never deletes recordings"
    assert {"s3:PutObject", "s3:PutObjectRetention", "s3:GetObject", "s3:ListBucket",
            "s3:GetBucketObjectLockConfiguration"} <= actions
    # State: PostgreSQL user, database and password.
    pg_env = service_env(services["postgres"])
    state = config["state"]["url"]
    assert state == f"postgresql://{pg_env['POSTGRES_USER']}@postgres:5432/{pg_env['POSTGRES_DB']}"
    assert gw_env["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]
    # OIDC: the issuer agents see, the keys the gateway fetches, the realm.
    kc = services["keycloak"]
    kc_env = service_env(kc)
    kc_port = re.search(r"--http-port=(\d+)", " ".join(kc["command"])).group(1)  # type: ignore[union-attr]
    realm = json.loads((DEPLOY / "keycloak" / "realm.json").read_text())
    (oidc,) = config["oidc"]
    assert oidc["issuer"] == f"{kc_env['KC_HOSTNAME']}/realms/{realm['realm']}"
    assert oidc["jwks_uri"] == f"http://keycloak:{kc_port}/realms/{realm['realm']}/protocol/openid-connect/certs"
    assert f"127.0.0.1:{kc_port}:{kc_port}" in kc["ports"]
    assert any(v.endswith("/opt/keycloak/data/import/realm.json:ro") for v in kc["volumes"])
    assert "--import-realm" in kc["command"]
    # TLS and keys: init.py writes where the config and the HEALTHCHECK look.
    assert gw_env["GUARITA_HEALTH_URL"].startswith("https://127.0.0.1:8080/")
    assert config["gateway"]["http_listen"].endswith(":8080") and config["gateway"]["tls_cert"]
    init_cmd = services["guarita-init"]["command"]
    ca_out = init_cmd[init_cmd.index("--target-ca-out") + 1]
    target_mount = next(v for v in services["target"]["volumes"] if v.startswith("target-ca:"))
    sshd = (DEPLOY / "compose" / "target" / "sshd_config").read_text()
    trusted = re.search(r"^TrustedUserCAKeys (\S+)", sshd, re.M).group(1)  # type: ignore[union-attr]
    assert Path(target_mount.split(":")[1]) / Path(ca_out).name == Path(trusted)
    assert any(v.startswith("target-ca:" + str(Path(ca_out).parent)) for v in services["guarita-init"]["volumes"])
    # The demo target: host key pinned, login created, reachable name.
    (target,) = config["targets"]
    pub = (DEPLOY / "compose" / "target" / "ssh_host_ed25519_key.pub").read_text().split()
    assert target["host_keys"] == [f"{pub[0]} {pub[1]}"]
    assert target["host"] == "target" and target["credential"] == "ca"
    target_dockerfile = (DEPLOY / "compose" / "target" / "Dockerfile").read_text()
    for login in target["logins"]:
        assert f"useradd --create-home --shell /bin/bash {login}" in target_dockerfile
        assert re.search(rf"^AllowUsers .*\b{login}\b", sshd, re.M)


def test_keycloak_realm_has_the_clients_groups_and_users() -> None:
    realm = json.loads((DEPLOY / "keycloak" / "realm.json").read_text())
    config = tomllib.loads(COMPOSE_CONFIG.read_text())
    audience = config["oidc"][0]["audience"]
    clients = {c["clientId"]: c for c in realm["clients"]}

    def mappers(client: dict[str, Any]) -> dict[str, dict[str, Any]]:
        return {m["protocolMapper"]: m["config"] for m in client["protocolMappers"]}

    agent = clients["agent-ci"]
    assert agent["publicClient"] is False and agent["serviceAccountsEnabled"] is True and agent["secret"]
    assert not agent["standardFlowEnabled"] and not agent["directAccessGrantsEnabled"]
    cli = clients["bastion-cli"]
    assert cli["publicClient"] is True
    assert cli["attributes"]["oauth2.device.authorization.grant.enabled"] == "true"
    for client in (agent, cli):
        m = mappers(client)
        assert m["oidc-group-membership-mapper"]["claim.name"] == config["oidc"][0].get("groups_claim", "groups")
        assert m["oidc-group-membership-mapper"]["full.path"] == "false"
        assert m["oidc-audience-mapper"]["included.custom.audience"] == audience
        assert m["oidc-audience-mapper"]["access.token.claim"] == "true"
        assert m["oidc-sub-mapper"]["access.token.claim"] == "true"
    # ES256: the short signature keeps client-credentials tokens under OpenSSH's 1,023 bytes.
    assert realm["defaultSignatureAlgorithm"] == "ES256"
    groups = {g["name"] for g in realm["groups"]}
    assert {"sre", "approvers"} <= groups
    users = {u["username"]: u for u in realm["users"]}
    assert users["alice"]["groups"] == ["/sre"] and users["bob"]["groups"] == ["/approvers"]
    assert users["service-account-agent-ci"]["serviceAccountClientId"] == "agent-ci"
    assert "/sre" in users["service-account-agent-ci"]["groups"]
    # Every group the gateway's rules name exists in the realm.
    named = {g for rule in config.get("access", []) for g in rule.get("groups", [])}
    named |= {g for rule in config.get("approvals", []) for g in rule.get("approvers", [])}
    assert named <= groups
    # The README's token command uses this client and secret.
    readme = (DEPLOY / "README.md").read_text()
    assert f"client_id={agent['clientId']}" in readme and f"client_secret={agent['secret']}" in readme
    assert f"/realms/{realm['realm']}/protocol/openid-connect/token" in readme


def test_compose_gateway_config_passes_check_config() -> None:
    # Its files live in the container (guarita-init makes them): only keys and values here.
    proc = run([*BASTION, "check-config", "--skip-files", str(COMPOSE_CONFIG)], cwd=ROOT)
    assert "OK" in proc.stdout


def run_init(tmp_path: Path) -> tuple[Path, Path]:
    """compose/init.py on a copy of the compose config whose paths point into tmp_path."""
    config = tmp_path / "guarita.toml"
    config.write_text(COMPOSE_CONFIG.read_text().replace("/var/lib/guarita", str(tmp_path / "data")))
    ca_out = tmp_path / "shared" / "target_ca.pub"
    run([sys.executable, str(DEPLOY / "compose" / "init.py"), "--config", str(config), "--target-ca-out", str(ca_out),
         "--bastion", shlex.join(BASTION)], cwd=ROOT)
    return config, ca_out


def test_compose_init_makes_keys_tls_and_the_target_ca_idempotently(tmp_path: Path) -> None:
    import asyncssh
    from cryptography import x509

    config, ca_out = run_init(tmp_path)
    data = tmp_path / "data"
    for name in ("recording_key.pem", "user_ca_key", "target_ca_key", "tls/cert.pem", "tls/key.pem"):
        assert (data / name).exists(), name
    assert (data / "tls/key.pem").stat().st_mode & 0o077 == 0, "the TLS key is private"
    line = ca_out.read_text().strip()
    target_ca = asyncssh.read_private_key(str(data / "target_ca_key"))
    assert line.split()[:2] == target_ca.export_public_key().decode().split()[:2]
    cert = x509.load_pem_x509_certificate((data / "tls/cert.pem").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert {"localhost", "gateway"} <= set(names)
    before = {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    run_init(tmp_path)
    after = {p.name: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    assert before == after, "a second run keeps every key and certificate"
    assert ca_out.read_text().strip() == line


def test_demo_target_sshd_config_is_valid_for_openssh(tmp_path: Path) -> None:
    sshd = "/usr/sbin/sshd"
    if not os.access(sshd, os.X_OK):
        missing("OpenSSH's sshd is not installed (.ci/install-deps installs openssh-server)")
    _, ca_out = run_init(tmp_path)
    host_key = tmp_path / "host_key"
    shutil.copy(DEPLOY / "compose" / "target" / "ssh_host_ed25519_key", host_key)
    host_key.chmod(0o600)
    proc = run([sshd, "-t", "-f", str(DEPLOY / "compose" / "target" / "sshd_config"), "-o", f"HostKey={host_key}",
                "-o", f"TrustedUserCAKeys={ca_out}"], check=False)
    assert proc.returncode == 0, proc.stderr
    priv = asyncssh_public_of(host_key)
    assert priv == " ".join((DEPLOY / "compose/target/ssh_host_ed25519_key.pub").read_text().split()[:2])


def asyncssh_public_of(path: Path) -> str:
    import asyncssh

    return " ".join(asyncssh.read_private_key(str(path)).export_public_key().decode().split()[:2])


class compose_gateway:  # noqa: N801 - used as a context manager like a function
    """The compose stack's gateway config, run for real on loopback: init.py's keys and TLS
    certificate, local recordings and SQLite instead of MinIO and PostgreSQL, and an
    unreachable Keycloak (so /readyz says not ready and /healthz says alive)."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> int:
        config, _ = run_init(self.tmp_path)
        (self.tmp_path / "recordings").mkdir()
        text = ""
        for _ in range(3):
            ssh_port, http_port = free_port(), free_port()
            log = (self.tmp_path / "gateway.log").open("wb")
            self.proc = subprocess.Popen(
                [*BASTION, "serve", "--config", str(config), "--ssh-listen", f"127.0.0.1:{ssh_port}",
                 "--http-listen", f"127.0.0.1:{http_port}", "--state", f"sqlite:///{self.tmp_path}/state.db",
                 "--recordings", (self.tmp_path / "recordings").as_uri()],
                cwd=ROOT, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.proc.poll() is None:
                if https_status(http_port, "/healthz") == 200:
                    return http_port
                time.sleep(0.1)
            self.__exit__()
            text = (self.tmp_path / "gateway.log").read_text()
            if "address already in use" not in text.lower():
                break
        pytest.fail(f"the gateway did not start with the compose config:\n{text}")

    def __exit__(self, *exc: object) -> None:
        proc, self.proc = self.proc, None
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def https_status(port: int, path: str) -> int | None:
    context = ssl._create_unverified_context()
    try:
        with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", timeout=2, context=context) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return None


def test_compose_gateway_serves_tls_health_and_reports_unready_without_its_issuer(tmp_path: Path) -> None:
    with compose_gateway(tmp_path) as port:
        assert https_status(port, "/healthz") == 200
        context = ssl._create_unverified_context()
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"https://127.0.0.1:{port}/readyz", timeout=5, context=context)
        assert err.value.code == 503
        body = json.loads(err.value.read())
        assert body["checks"]["oidc_keys"] is False
        # Plain HTTP is refused: the API is TLS-only outside --dev.
        with pytest.raises((urllib.error.URLError, http.client.HTTPException, OSError)):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5).read()


# -- Helm ---------------------------------------------------------------------------------------

# Value sets the chart is rendered with: the defaults, and the other branches of every
# template (one replica on SQLite, existing secrets, no in-cluster RBAC, ServiceMonitor...).
HELM_CASES: dict[str, list[str]] = {
    "defaults": [],
    "production": ["--set", "replicaCount=4", "--set", "keys.existingSecret=guarita-keys",
                   "--set", "tls.existingSecret=guarita-tls", "--set", "state.passwordSecret.name=guarita-db",
                   "--set", "recording.s3.credentialsSecret.name=guarita-s3",
                   "--set", "recording.s3.endpoint=https://minio.example:9000", "--set", "recording.s3.region=sa-east-1",
                   "--set", "metrics.serviceMonitor.enabled=true", "--set", "targetKeysSecret=guarita-target-keys",
                   "--set", "image.digest=sha256:" + "0" * 64, "--set", "gateway.serverNames={bastion.example.com}",
                   "--set", "spool.medium=Memory"],
    "single-sqlite-no-cluster": ["--set", "replicaCount=1", "--set", "state.url=",
                                 "--set", "kubernetes.inCluster.enabled=false", "--set", "preStopSleepSeconds=0",
                                 "--set", "podDisruptionBudget.enabled=false", "--set", "service.type=ClusterIP"],
}


def helm_template(case: str, *extra: str) -> list[dict[str, Any]]:
    helm = tool("helm")
    proc = run([helm, "template", "gw", str(CHART), "--namespace", "access", *HELM_CASES[case], *extra])
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def by_kind(docs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for d in docs:
        out.setdefault(d["kind"], []).append(d)
    return out


@pytest.mark.parametrize("case", sorted(HELM_CASES))
def test_helm_lint_strict(case: str) -> None:
    helm = tool("helm")
    proc = run([helm, "lint", "--strict", str(CHART), *HELM_CASES[case]])
    assert "0 chart(s) failed" in proc.stdout
    # Helm's lint mode reports a template's `fail` as INFO and passes: catch it here.
    assert "funcMap fail" not in proc.stderr + proc.stdout, proc.stderr


@pytest.mark.parametrize("case", sorted(HELM_CASES))
def test_helm_manifests_validate_against_kubernetes_schemas(case: str, tmp_path: Path) -> None:
    validator = tool("kubernetes-validate")
    docs = helm_template(case)
    core = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    manifest = tmp_path / "manifests.yaml"
    manifest.write_text(yaml.safe_dump_all(core))
    for version in KUBE_VERSIONS:
        proc = run([validator, "--strict", "-k", version, str(manifest)], check=False)
        assert proc.returncode == 0, f"Kubernetes {version} schemas:\n{proc.stdout}{proc.stderr}"
        passed = proc.stdout.count(" passed ") + proc.stderr.count(" passed ")
        assert passed == len(core), f"validated {passed} of {len(core)} resources:\n{proc.stdout}{proc.stderr}"
    for d in docs:
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"]
        assert len(d["metadata"]["name"]) <= 63


def test_the_schema_validator_rejects_a_broken_manifest(tmp_path: Path) -> None:
    """A negative control: the validator used above does fail on a wrong field."""
    validator = tool("kubernetes-validate")
    deployment = by_kind(helm_template("defaults"))["Deployment"][0]
    deployment["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "ssh"
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["bogus"] = 1
    manifest = tmp_path / "broken.yaml"
    manifest.write_text(yaml.safe_dump(deployment))
    proc = run([validator, "--strict", "-k", KUBE_VERSIONS[-1], str(manifest)], check=False)
    assert proc.returncode != 0


def test_helm_refuses_values_that_cannot_work() -> None:
    helm = tool("helm")
    bad = {
        "replicaCount=3,state.url=": "state.url",
        "recording.url=file:///tmp/rec": "recording.url",
        "keys.generate=false": "keys.existingSecret",
        "config=[gateway]\ndata_dir = \"/x\"": "[gateway]",
    }
    for values, words in bad.items():
        proc = run([helm, "template", "gw", str(CHART), "--set-string" if "\n" in values else "--set", values],
                   check=False)
        assert proc.returncode != 0 and words in proc.stderr, (values, proc.stderr)


def test_helm_deployment_is_stateless_hardened_and_probed() -> None:
    kinds = by_kind(helm_template("production"))
    (dep,) = kinds["Deployment"]
    spec = dep["spec"]
    assert spec["replicas"] == 4
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert c["image"] == "guarita@sha256:" + "0" * 64
    assert c["args"] == ["serve", "--config", "/etc/guarita/config/guarita.toml"]
    assert {p["name"]: p["containerPort"] for p in c["ports"]} == {"ssh": 2222, "kube": 8443, "http": 8080}
    for probe, path in (("startupProbe", "/healthz"), ("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert c[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTPS"}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 10001 and psc["fsGroup"] == 10001
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"]
    assert pod["terminationGracePeriodSeconds"] >= 60
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "sleep"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "guarita-keys"
    assert volumes["tls"]["secret"]["secretName"] == "guarita-tls"
    assert volumes["target-keys"]["secret"]["secretName"] == "guarita-target-keys"
    assert volumes["config"]["configMap"]["name"] == dep["metadata"]["name"]
    assert volumes["data"]["emptyDir"]["sizeLimit"] and volumes["data"]["emptyDir"]["medium"] == "Memory"
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    assert mounts["data"]["mountPath"] == "/var/lib/guarita" and "readOnly" not in mounts["data"]
    assert all(m.get("readOnly") for n, m in mounts.items() if n in ("keys", "tls", "config", "target-keys"))
    env = {e["name"]: e for e in c["env"]}
    assert env["PGPASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "guarita-db", "key": "password"}
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "guarita-s3"
    assert env["AWS_ENDPOINT_URL_S3"]["value"] == "https://minio.example:9000"
    assert env["GUARITA_HEALTH_URL"]["value"] == "https://127.0.0.1:8080/healthz"
    assert "checksum/config" in spec["template"]["metadata"]["annotations"]
    assert pod["automountServiceAccountToken"] is True
    # No Secret is rendered when existing ones are named.
    assert "Secret" not in kinds


def test_helm_service_pdb_rbac_and_servicemonitor() -> None:
    kinds = by_kind(helm_template("production"))
    (svc,) = kinds["Service"]
    assert svc["spec"]["type"] == "LoadBalancer" and svc["spec"]["sessionAffinity"] == "None"
    assert {p["name"]: (p["port"], p["targetPort"]) for p in svc["spec"]["ports"]} == {
        "ssh": (2222, "ssh"), "kube": (8443, "kube"), "http": (8080, "http")}
    selector = kinds["Deployment"][0]["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"] == selector
    (pdb,) = kinds["PodDisruptionBudget"]
    assert pdb["spec"]["selector"]["matchLabels"] == selector and pdb["spec"]["maxUnavailable"] == 1
    # Exactly the impersonation the Kubernetes front door needs, nothing else.
    (role,) = kinds["ClusterRole"]
    assert role["rules"] == [{"apiGroups": [""], "resources": ["users", "groups", "serviceaccounts"],
                              "verbs": ["impersonate"]}]
    (binding,) = kinds["ClusterRoleBinding"]
    (sa,) = kinds["ServiceAccount"]
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "access"}]
    assert kinds["Deployment"][0]["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert not kinds.get("Role") and not kinds.get("RoleBinding")
    # ServiceMonitor: no schema for this CRD here, so its fields are checked one by one.
    (sm,) = kinds["ServiceMonitor"]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["spec"]["selector"]["matchLabels"] == selector
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["access"]}
    (endpoint,) = sm["spec"]["endpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics" and endpoint["scheme"] == "https"
    assert re.fullmatch(r"\d+[smh]", endpoint["interval"]) and "insecureSkipVerify" in endpoint["tlsConfig"]


def test_helm_without_in_cluster_access_has_no_rbac_and_no_token() -> None:
    kinds = by_kind(helm_template("single-sqlite-no-cluster"))
    assert "ClusterRole" not in kinds and "ClusterRoleBinding" not in kinds
    assert "PodDisruptionBudget" not in kinds and "ServiceMonitor" not in kinds
    (dep,) = kinds["Deployment"]
    assert dep["spec"]["replicas"] == 1
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert "lifecycle" not in dep["spec"]["template"]["spec"]["containers"][0]
    config = tomllib.loads(kinds["ConfigMap"][0]["data"]["guarita.toml"])
    assert "state" not in config and "clusters" not in config


@pytest.mark.parametrize("case", sorted(HELM_CASES))
def test_helm_rendered_config_and_keys_work_with_bastion(case: str, tmp_path: Path) -> None:
    """The ConfigMap's guarita.toml passes `bastion check-config`, and the keys and the TLS
    certificate the chart generates load in the gateway's own code (`bastion keys`)."""
    kinds = by_kind(helm_template(case))
    text = kinds["ConfigMap"][0]["data"]["guarita.toml"]
    config = tomllib.loads(text)
    assert config["gateway"]["audit_log"] == "-"
    assert config["recording"]["url"].startswith("s3://")
    secrets = {s["metadata"]["name"]: s for s in kinds.get("Secret", [])}
    keys_dir, tls_dir = tmp_path / "etc/keys", tmp_path / "etc/tls"
    for d in (keys_dir, tls_dir):
        d.mkdir(parents=True)
    if case == "defaults":
        keys = secrets["gw-guarita-keys"]
        tls = secrets["gw-guarita-tls"]
        for secret in (keys, tls):
            assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert set(keys["data"]) == {"recording_key.pem", "user_ca_key", "target_ca_key", "ssh_host_ed25519_key"}
        for name, value in keys["data"].items():
            (keys_dir / name).write_bytes(base64.b64decode(value))
        for name, value in tls["data"].items():
            (tls_dir / name).write_bytes(base64.b64decode(value))
    else:
        # Existing secrets: stand in with keys bastion makes itself, and init.py's certificate.
        run([*BASTION, "keys", "--data-dir", str(keys_dir)])
        shutil.copy(keys_dir / "user_ca_key", keys_dir / "ssh_host_ed25519_key")
        spec = importlib.util.spec_from_file_location("guarita_compose_init", DEPLOY / "compose" / "init.py")
        assert spec and spec.loader
        init = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(init)
        init.self_signed(tls_dir / "tls.crt", tls_dir / "tls.key", ["localhost"])
    local = text.replace("/etc/guarita/keys", str(keys_dir)).replace("/etc/guarita/tls", str(tls_dir))
    local = local.replace("/var/lib/guarita", str(tmp_path / "data"))
    rendered = tmp_path / "guarita.toml"
    rendered.write_text(local)
    proc = run([*BASTION, "check-config", str(rendered)], cwd=tmp_path)
    assert "OK" in proc.stdout
    public = run([*BASTION, "keys", "--config", str(rendered)], cwd=tmp_path).stdout
    assert "BEGIN PUBLIC KEY" in public and public.count("ssh-ed25519 ") == 2
    assert asyncssh_public_of(keys_dir / "ssh_host_ed25519_key").startswith("ssh-ed25519 ")
    # The generated TLS certificate matches its key and names the Service.
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls_dir / "tls.crt", tls_dir / "tls.key")
    if case == "defaults":
        from cryptography import x509

        cert = x509.load_pem_x509_certificate((tls_dir / "tls.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "gw-guarita.access.svc" in names.get_values_for_type(x509.DNSName)


def values_lines() -> dict[tuple[str, ...], int]:
    """Key path -> line index in values.yaml (block mappings only, as the file is written)."""
    paths: dict[tuple[str, ...], int] = {}
    stack: list[tuple[int, str]] = []
    for i, line in enumerate((CHART / "values.yaml").read_text().splitlines()):
        match = re.match(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*):(\s|$)", line)
        if not match:
            continue
        indent = len(match.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, match.group(2)))
        paths[tuple(k for _, k in stack)] = i
    return paths


def test_helm_values_are_all_documented_and_all_used() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    located = values_lines()
    templates = "\n".join(p.read_text() for p in (CHART / "templates").iterdir())
    used = {tuple(m.split(".")) for m in re.findall(r"\.Values\.([A-Za-z0-9_.]+)", templates)}
    # `with .Values.x` blocks use `.name` etc. relative to x: count their fields as used.
    for block in re.findall(r"\{\{-? with \.Values\.([A-Za-z0-9_.]+) \}\}(.*?)\{\{-? end \}\}", templates, re.S):
        used |= {(*block[0].split("."), f) for f in re.findall(r"\{\{[^}]*?\s\.([A-Za-z][A-Za-z0-9_]*)", block[1])}

    def leaves(node: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        if isinstance(node, dict) and node and path not in used:
            for key, value in node.items():
                yield from leaves(value, (*path, key))
        else:
            yield path

    undocumented, unused = [], []
    for path in leaves(values, ()):
        if not any(path[:n] in used for n in range(1, len(path) + 1)):
            unused.append(".".join(path))
        index = located[path]
        if not lines[index - 1].lstrip().startswith("#"):
            undocumented.append(".".join(path))
    assert not undocumented, f"values without a comment above them: {undocumented}"
    assert not unused, f"values no template uses: {unused}"


@pytest.mark.parametrize("case", sorted(HELM_CASES))
def test_helm_install_dry_run_renders_notes(case: str) -> None:
    """`helm install --dry-run=client` renders NOTES.txt (helm template does not)."""
    helm = tool("helm")
    proc = run([helm, "install", "gw", str(CHART), "--dry-run=client", "--namespace", "access", *HELM_CASES[case]])
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert "bastion keys --config /etc/guarita/config/guarita.toml" in notes
    assert "ssh -p 2222 LOGIN@TARGET@ADDRESS" in notes
    assert ("bastion kubeconfig --cluster in-cluster" in notes) == (case != "single-sqlite-no-cluster")
    assert ("self-signed" in notes) == (case != "production")
    assert ("SQLite" in notes) == (case == "single-sqlite-no-cluster")


def test_helm_notes_and_helpers_exist() -> None:
    for name in ("NOTES.txt", "_helpers.tpl", "deployment.yaml", "service.yaml", "pdb.yaml", "rbac.yaml",
                 "serviceaccount.yaml", "configmap.yaml", "secret-keys.yaml", "secret-tls.yaml",
                 "servicemonitor.yaml"):
        assert (CHART / "templates" / name).exists(), name
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2" and chart["name"] == "guarita"
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"], "Chart appVersion follows the package version"


# -- systemd ------------------------------------------------------------------------------------


def unit_settings() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        assert current is not None
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def installed_unit(tmp_path: Path) -> Path:
    """The unit with /opt/guarita/bin/bastion pointing at this machine's bastion."""
    bastion = shutil.which("bastion") or str(Path(sys.executable).parent / "bastion")
    if not os.access(bastion, os.X_OK):
        pytest.fail("the bastion command is not installed (pip install -e .)")
    unit = tmp_path / "guarita.service"
    unit.write_text(UNIT.read_text().replace("/opt/guarita/bin/bastion", bastion))
    return unit


def test_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or missing(f"systemd-analyze is not installed: {INSTALL_HINT}")
    proc = run([str(analyze), "verify", str(installed_unit(tmp_path))], check=False)
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_systemd_security_exposure_is_low(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze") or missing(f"systemd-analyze is not installed: {INSTALL_HINT}")
    proc = run([str(analyze), "security", "--offline=true", "--no-pager", str(installed_unit(tmp_path))], check=False)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    if match is None and "offline" in proc.stderr:
        pytest.skip(f"this systemd-analyze has no --offline: {proc.stderr.strip()}")
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= 2.0, proc.stdout


def test_systemd_unit_hardening() -> None:
    s = unit_settings()["Service"]

    def one(key: str) -> str:
        assert key in s, f"{key} is missing"
        return s[key][-1]

    assert one("ExecStart").endswith("bastion serve --config /etc/guarita/guarita.toml")
    assert one("User") == "guarita" or one("DynamicUser") == "yes"
    assert one("StateDirectory") == "guarita"
    for key, value in {"NoNewPrivileges": "yes", "ProtectSystem": "strict", "ProtectHome": "yes",
                       "PrivateTmp": "yes", "PrivateDevices": "yes", "CapabilityBoundingSet": "",
                       "KillSignal": "SIGTERM", "Restart": "on-failure"}.items():
        assert one(key) == value, f"{key}={one(key)!r}, expected {value!r}"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert s["SystemCallFilter"][0] == "@system-service"
    stop = one("TimeoutStopSec")
    assert int(stop.rstrip("s")) >= 60, "long enough for the drain"
    assert "AmbientCapabilities" not in s or one("AmbientCapabilities") == ""
    sysusers = (DEPLOY / "systemd" / "guarita.sysusers").read_text()
    assert re.search(r"^u\s+guarita\s", sysusers, re.M)
    for line in (DEPLOY / "systemd" / "guarita.env.example").read_text().splitlines():
        assert not line or line.startswith("#") or re.match(r"^[A-Z_][A-Z0-9_]*=", line), line


# -- documentation -------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["deploy/README.md", "docs/operations.md", "docs/lgpd.md"])
def test_docs_links_resolve(doc: str) -> None:
    path = ROOT / doc
    text = path.read_text()
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (path.parent / target).exists(), f"{doc}: broken link {target}"


def test_deploy_readme_commands_match_the_stack() -> None:
    readme = (DEPLOY / "README.md").read_text()
    assert "docker compose -f deploy/compose.yaml up -d --build --wait" in readme
    assert "ssh -p 2222" in readme and "deploy@demo@localhost" in readme
    assert "replay --config /etc/guarita/guarita.toml ls" in readme
    askpass = DEPLOY / "compose" / "askpass.sh"
    assert askpass.exists() and os.access(askpass, os.X_OK)
    proc = run([str(askpass), "prompt"], env={**os.environ, "GUARITA_TOKEN": "tok"})
    assert proc.stdout == "tok\n"
