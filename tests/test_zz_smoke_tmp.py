import subprocess
from tests.support.openssh import run_ssh

def test_smoke(gateway, oidc, targets):
    tok = oidc.token("agent-sre")
    for inp in (b"hello", None):
        for cmd in ("cat", "wc -c"):
            try:
                r = run_ssh(["-p", str(gateway.ssh_port), f"{targets.login}@web-key@127.0.0.1", cmd], token=tok, input=inp, timeout=5)
                print("OK", inp, cmd, r)
            except subprocess.TimeoutExpired as e:
                print("TIMEOUT", inp, cmd, e.output, e.stderr)
    r = run_ssh(["-i", str(targets.gateway_key), "-p", str(targets.web_key.port), f"{targets.login}@127.0.0.1", "wc -c"], input=b"hello")
    print("direct", r)
