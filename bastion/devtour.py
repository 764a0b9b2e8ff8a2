"""The tour of ``bastion serve --dev``: one copy-paste line per capability, printed in the
banner, and run by ``bastion demo`` (bastion/cli_demo.py) exactly as printed.

Lines run in bash one after another; an ``export`` line carries its variables to the
next lines, as in the terminal the newcomer pastes them in. A few values are known only
when the tour runs (the id of a held request, of a recording, of a lock): the line shows
them in capitals (REQUEST_ID), a step before prints them, and ``bastion demo`` fills them
in from that step's output.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

TOUR_FILE = "dev-tour.json"  # in the data dir: where `bastion demo` finds the running gateway
CPF = "529.982.247-25"
PROMPT = r"[$#>] ?$"  # the end of a shell prompt, what the terminal shows before a person types  # a valid CPF (check digits), masked by the demo's [masking]


class Kind(Enum):
    SETUP = "setup"  # an export: its variables reach the next lines
    RUN = "run"  # a command that ends by itself
    SHELL = "shell"  # an interactive terminal: bastion demo types `typed` under a pseudo-terminal
    HELD = "held"  # waits for an approver: bastion demo starts it, approves it in the next step, then checks it


@dataclass(frozen=True)
class Step:
    what: str
    line: str
    kind: Kind = Kind.RUN
    expect: str = ""  # a regex the output must match (its group 1 is `capture`)
    absent: str = ""  # a regex the output must NOT match (a masked value)
    exit: int | None = 0
    capture: str = ""  # the name the next lines use for group 1 of `expect`
    typed: tuple[str, ...] = ()
    done: str = ""  # HELD: what its output shows once approved


@dataclass(frozen=True)
class Where:
    """What the tour's lines need to know of the running gateway."""

    ssh_host: str
    ssh_port: int
    http_url: str
    data_dir: str
    kube: bool = True
    console: bool = False
    host_key: str = ""  # the gateway's SSH host key ("ssh-ed25519 AAAA..."): known_hosts pins it
    forward_port: int = 0  # a local port free when the gateway started, for the port-forward line

    @property
    def known_hosts(self) -> str:
        return str(Path(self.data_dir) / "known_hosts")

    def save(self, data_dir: Path) -> None:
        """The tour for `bastion demo`, and a known_hosts file with the gateway's host key: ssh
        checks it from the first connection on (no trust on first use, no clash with an earlier
        --dev on the same port in ~/.ssh/known_hosts)."""
        (data_dir / TOUR_FILE).write_text(json.dumps(self.__dict__))
        host = self.ssh_host if self.ssh_port == 22 else f"[{self.ssh_host}]:{self.ssh_port}"
        (data_dir / "known_hosts").write_text(f"{host} {self.host_key}\n")

    @classmethod
    def load(cls, data_dir: Path) -> Where:
        return cls(**json.loads((data_dir / TOUR_FILE).read_text()))


def steps(w: Where) -> list[Step]:
    ssh = f"ssh -p {w.ssh_port} -o UserKnownHostsFile={shlex.quote(w.known_hosts)}"
    at = f"demo@{w.ssh_host}"
    dd = shlex.quote(w.data_dir)
    kubeconfig = shlex.quote(str(Path(w.data_dir) / "kubeconfig"))
    tour = [
        Step("this gateway", f"export GUARITA_URL={w.http_url}", Kind.SETUP),
        Step("an agent's token (dev-token mints agent, approver, auditor, operator)",
             "export GUARITA_TOKEN=$(bastion dev-token agent)", Kind.SETUP),
        Step("ssh presents the token", "export SSH_ASKPASS=$(command -v bastion-askpass) SSH_ASKPASS_REQUIRE=force",
             Kind.SETUP),
        Step("exec", f"{ssh} {at} 'uname -sr'", expect=r"Linux"),
        Step("shell (type exit to leave)", f"{ssh} -t {at}", Kind.SHELL, expect=r"shell-42",
             typed=("echo shell-$((6*7))", "exit")),
        Step("a CPF, masked live and in the recording", f"{ssh} {at} 'echo customer {CPF}'",
             expect=r"customer \S", absent=re.escape(CPF)),
        Step("a held command (rm -rf waits for an approver)", f"{ssh} {at} 'rm -rf /tmp/guarita-tour'", Kind.HELD,
             expect=r"bastion approvals approve (\S+)", capture="REQUEST_ID", done=r"approved"),
        Step("approve it from a second terminal (as the approver)",
             "GUARITA_TOKEN=$(bastion dev-token approver) bastion approvals approve REQUEST_ID --reason 'tour'",
             expect=r"approve recorded"),
    ]
    if w.kube:
        tour += [
            Step("a kubeconfig for the demo cluster (pods are local processes, not Kubernetes)",
                 f"bastion kubeconfig --dev --output {kubeconfig}", expect=r"written"),
            Step("kubectl uses it", f"export KUBECONFIG={kubeconfig}", Kind.SETUP),
            Step("kubectl get", "kubectl get pods", expect=r"\bweb\b"),
            Step("kubectl exec", f"kubectl exec web -- sh -c 'uname -sr; echo customer {CPF}'",
                 expect=r"Linux[\s\S]*customer \S", absent=re.escape(CPF)),
            Step("kubectl exec -it (type exit to leave)", "kubectl exec -it web -- sh", Kind.SHELL,
                 expect=r"pod-42", typed=("echo pod-$((6*7))", "exit")),
            Step("kubectl logs", "kubectl logs web", expect=r"log line 1"),
        ]
        if w.forward_port:
            tour.append(_port_forward(w))
    tour += [
        Step("replay: what happened", f"replay ls --subject agent --data-dir {dd}",
             expect=r"^(\S+)\s.*uname -sr", capture="SESSION_ID"),
        Step("replay one session", f"replay cat SESSION_ID --data-dir {dd}", expect=r"Linux"),
        Step("verify every recording (hash chain, signature)", f"replay verify --all --data-dir {dd}",
             expect=r"OK"),
        Step("evidence package for the agent",
             f"replay evidence --subject agent --output {shlex.quote(str(Path(w.data_dir) / 'evidence-agent.tar.gz'))}"
             f" --data-dir {dd}", expect=r"verified OK"),
        Step("lock the agent (as the operator)",
             "GUARITA_TOKEN=$(bastion dev-token operator) bastion lock --subject agent --until 10m --reason 'tour'",
             expect=r"lock (\S+):", capture="LOCK_ID"),
        Step("the agent is refused", f"{ssh} {at} true", exit=255, expect=r"(?i)lock"),
        Step("unlock it", "GUARITA_TOKEN=$(bastion dev-token operator) bastion unlock LOCK_ID", expect=r"(?i)lift|unlock"),
    ]
    return tour


def _port_forward(w: Where) -> Step:
    """kubectl port-forward to a port of pod web, which is this machine: the gateway's own
    HTTP API answers. curl waits (retrying a refused connection) until kubectl listens."""
    remote = w.http_url.rsplit(":", 1)[1].split("/")[0]
    local = w.forward_port
    return Step(f"kubectl port-forward (pods are this machine: port {remote} is the gateway's own HTTP API)",
                f"kubectl port-forward pod/web {local}:{remote} & curl -s --noproxy '*' --retry 20 "
                f"--retry-connrefused --retry-delay 1 http://127.0.0.1:{local}/healthz; kill $!",
                expect=r'Forwarding from[\s\S]*"status": "ok"')


def free_port(host: str = "127.0.0.1") -> int:
    """A local port free now (the tour prints it; it is taken only when the line runs)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def banner(w: Where) -> list[str]:
    """The tour as the banner prints it: a comment line, then the command line, per step."""
    lines = ["Try every capability (or run them all: bastion demo" + _data_dir_flag(w) + "):"]
    for s in steps(w):
        lines += [f"  # {s.what}", f"  {s.line}"]
    lines.append("  # REQUEST_ID, SESSION_ID and LOCK_ID: printed by the line before them")
    if w.console:
        lines.append(f"  # web console: {w.http_url}/console/  (sign in as the approver to decide held commands)")
    return lines


def _data_dir_flag(w: Where) -> str:
    return "" if w.data_dir in ("guarita-data", str(Path("guarita-data").resolve())) else f" --data-dir {w.data_dir}"


def parse_banner(text: str) -> list[str]:
    """The command lines of a printed banner, in order (what a user copies)."""
    out, inside = [], False
    for raw in text.splitlines():
        if raw.startswith("Try every capability"):
            inside = True
            continue
        if inside:
            if not raw.startswith("  "):
                break
            if not raw.strip().startswith("#"):
                out.append(raw[2:])
    return out


# -- running it ---------------------------------------------------------------------------


@dataclass
class Result:
    step: Step
    line: str
    ok: bool
    output: str
    why: str = ""


class Runner:
    """Runs the tour's lines in bash, carrying exports and captured ids from line to line."""

    def __init__(self, env: Mapping[str, str], cwd: Path | None = None, timeout: float = 60.0) -> None:
        self.env = dict(env)
        self.cwd = cwd
        self.timeout = timeout
        self.values: dict[str, str] = {}
        self._held: tuple[Step, subprocess.Popen[bytes], Path] | None = None

    def fill(self, line: str) -> str:
        for name, value in self.values.items():
            line = line.replace(name, value)
        return line

    def run(self, step: Step, printed: str | None = None) -> Result:
        line = self.fill(printed if printed is not None else step.line)
        try:
            if step.kind is Kind.SETUP:
                result = self._setup(step, line)
            elif step.kind is Kind.SHELL:
                result = self._shell(step, line)
            elif step.kind is Kind.HELD:
                result = self._start_held(step, line)
            else:
                result = self._run(step, line)
        except (OSError, subprocess.SubprocessError, TimeoutError) as exc:
            result = Result(step, line, False, "", f"{type(exc).__name__}: {exc}")
        if result.ok and self._held is not None and step.kind is not Kind.HELD:
            result = self._finish_held(result)
        return result

    def _check(self, step: Step, line: str, output: str, code: int | None) -> Result:
        if step.exit is not None and code != step.exit:
            return Result(step, line, False, output, f"exit status {code}, expected {step.exit}")
        found = re.search(step.expect, output, re.MULTILINE) if step.expect else None
        if step.expect and not found:
            return Result(step, line, False, output, f"expected {step.expect!r} in the output")
        if step.absent and re.search(step.absent, output):
            return Result(step, line, False, output, f"{step.absent!r} must not appear")
        if step.capture and found:
            self.values[step.capture] = found.group(1)
        return Result(step, line, True, output)

    def _setup(self, step: Step, line: str) -> Result:
        done = subprocess.run(["bash", "-c", f"{line}\nenv -0"], env=self.env, cwd=self.cwd, capture_output=True,
                              timeout=self.timeout)
        if done.returncode != 0:
            return Result(step, line, False, done.stderr.decode(errors="replace"), f"exit status {done.returncode}")
        self.env = dict(item.split("=", 1) for item in done.stdout.decode().split("\0") if "=" in item)
        return Result(step, line, True, "")

    def _run(self, step: Step, line: str) -> Result:
        done = subprocess.run(["bash", "-c", line], env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=self.timeout)
        output = (done.stdout + done.stderr).decode(errors="replace")
        return self._check(step, line, output, done.returncode)

    def _start_held(self, step: Step, line: str) -> Result:
        out = Path(tempfile.mkstemp(prefix="guarita-tour-")[1])
        with open(out, "wb") as sink:
            proc = subprocess.Popen(["bash", "-c", line], env=self.env, cwd=self.cwd, stdin=subprocess.DEVNULL,
                                    stdout=sink, stderr=sink, start_new_session=True)
        self._held = (step, proc, out)
        output = _wait_for(lambda: out.read_text(errors="replace"), step.expect, proc.poll, self.timeout)
        result = self._check(step, line, output, 0)
        if not result.ok:
            self._stop_held()
        return result

    def _finish_held(self, result: Result) -> Result:
        assert self._held is not None
        step, proc, out = self._held
        try:
            code = proc.wait(self.timeout)
        except subprocess.TimeoutExpired:
            code = None
        output = out.read_text(errors="replace")
        self._stop_held()
        if code != 0 or not re.search(step.done, output):
            return Result(result.step, result.line, False, result.output + output,
                          f"the held command did not run after the approval (exit {code})")
        last = [line for line in output.splitlines() if line.strip()][-1]
        return Result(result.step, result.line, True, f"{result.output}\nthe held command: {last.strip()}")

    def _stop_held(self) -> None:
        if self._held is not None:
            _, proc, out = self._held
            self._held = None
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
                proc.wait(5)
            out.unlink(missing_ok=True)

    def _shell(self, step: Step, line: str) -> Result:
        with _Terminal(["bash", "-c", line], self.env, self.cwd) as term:
            for typed in step.typed:
                term.wait_for(PROMPT, self.timeout)  # type only once the shell reads, as a person does
                term.send(typed.encode() + b"\r")
            code = term.wait(self.timeout)
            return self._check(step, line, term.text(), code)

    def close(self) -> None:
        self._stop_held()


def _wait_for(read: Callable[[], str], pattern: str, ended: Callable[[], int | None], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = read()
        if re.search(pattern, text, re.MULTILINE) or ended() is not None or time.monotonic() > deadline:
            return text
        time.sleep(0.05)


class _Terminal:
    """A command under a pseudo-terminal, as a person at a terminal runs it."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path | None) -> None:
        import pty

        self.master, slave = pty.openpty()
        try:
            self.proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, cwd=cwd,
                                         env={"TERM": "xterm", **env}, start_new_session=True,
                                         preexec_fn=_controlling_tty)
        finally:
            os.close(slave)
        self.buffer = bytearray()
        self.seen = 0

    def __enter__(self) -> _Terminal:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 9)
            self.proc.wait(5)
        with contextlib.suppress(OSError):
            os.close(self.master)

    def _read(self, timeout: float) -> bool:
        if not select.select([self.master], [], [], max(0.0, timeout))[0]:
            return True
        try:
            data = os.read(self.master, 65536)
        except OSError:  # EIO: the command ended
            return False
        self.buffer += data
        return bool(data)

    def text(self) -> str:
        return self.buffer.decode(errors="replace")

    def send(self, data: bytes) -> None:
        os.write(self.master, data)

    def wait_for(self, pattern: str, timeout: float) -> None:
        """Until ``pattern`` ends the output that came since the last wait (a prompt)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode())
        while not regex.search(bytes(self.buffer[self.seen:])):
            if time.monotonic() > deadline:
                raise TimeoutError(f"no prompt after {timeout:.0f}s; the terminal showed: {self.text()[-300:]!r}")
            if not self._read(deadline - time.monotonic()):
                return
        self.seen = len(self.buffer)

    def wait(self, timeout: float) -> int | None:
        deadline = time.monotonic() + timeout
        while self._read(min(0.2, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                return None
        with contextlib.suppress(subprocess.TimeoutExpired):
            return self.proc.wait(max(0.1, deadline - time.monotonic()))
        return None


def _controlling_tty() -> None:  # in the child, after setsid()
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)
