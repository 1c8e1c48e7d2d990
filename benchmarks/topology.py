"""Replicas behind a load balancer, for real, on loopback: ``python -m server`` processes sharing one
adapter store, fronted by the shipped ``deploy/nginx.conf`` or ``deploy/haproxy.cfg`` run by the
system's own nginx / haproxy. The configs name compose hosts (``lora-1:8000`` ...); ``render_*``
points them at loopback ports and changes nothing else. Used by tests/test_topology.py and
benchmarks/replicas.py.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
LOOPBACK = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def find_binary(name: str) -> str | None:
    """``name`` on PATH or in the sbin directories Debian installs daemons to."""
    return shutil.which(name) or next(
        (str(p) for d in ("/usr/sbin", "/sbin", "/usr/local/sbin") if (p := Path(d) / name).is_file()), None)


@dataclass
class Replica:
    """One ``python -m server`` process; its output goes to ``log_path``."""

    name: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 300.0) -> None:
        def exited() -> str | None:
            code = self.proc.poll()
            return None if code is None else f"replica {self.name} exited with {code}:\n{self.log()[-3000:]}"

        if not wait_ready(self.url, timeout, exited):
            raise TimeoutError(f"replica {self.name} not ready after {timeout} s:\n{self.log()[-3000:]}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def terminate(self) -> None:
        """SIGTERM: stop accepting, drain in-flight requests, exit."""
        self.proc.terminate()

    def kill(self) -> None:
        self.proc.kill()

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (drain), then SIGKILL if the drain takes longer than ``timeout``."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the process that started it dies, however it dies
    (a killed test run or benchmark must not leave servers behind holding gigabytes)."""
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def wait_ready(url: str, timeout: float, failed: Callable[[], str | None] = lambda: None,
               interval: float = 0.2) -> bool:
    """Poll ``url``/ready until it answers 200 (True) or ``timeout`` passes (False); ``failed()``
    returning a message (the server died) raises RuntimeError with it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (message := failed()) is not None:
            raise RuntimeError(message)
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return True
        except httpx.TransportError:
            pass
        time.sleep(interval)
    return False


def start_replica(name: str, workdir: Path, store: Path, args: list[str], threads: int = 1,
                  env: Mapping[str, str] | None = None) -> Replica:
    """Start (don't wait for) a replica named ``name`` on a free port over the store ``store``;
    ``env`` adds to the environment (the default: OpenMP workers spin briefly, as ``make serve``)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {"GOMP_SPINCOUNT": "20000"})}
    cmd = [sys.executable, "-m", "server", "--host", LOOPBACK, "--port", str(port), "--threads", str(threads),
           "--adapter-store-dir", str(store), "--replica-id", name, *args]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                preexec_fn=_die_with_parent)
    return Replica(name, port, proc, log_path)


def _upstreams(text: str, replicas: dict[str, int]) -> str:
    """``lora-N:8000`` -> the loopback port of the N-th replica (in ``replicas`` order); the server
    lines of replicas beyond ``len(replicas)`` are dropped."""
    ports = list(replicas.values())
    server = re.compile(r"\blora-(\d+):8000\b")
    lines = [line for line in text.splitlines(keepends=True)
             if not (m := server.search(line)) or int(m.group(1)) <= len(ports)]
    return server.sub(lambda m: f"{LOOPBACK}:{ports[int(m.group(1)) - 1]}", "".join(lines))


def render_nginx(replicas: dict[str, int], port: int, workdir: Path) -> str:
    text = (DEPLOY / "nginx.conf").read_text()
    text = _upstreams(text, replicas)
    text = text.replace("listen 80;", f"listen {LOOPBACK}:{port};")
    text = text.replace('js_path "/etc/nginx/njs/";', f'js_path "{DEPLOY / "nginx"}/";')
    return text.replace("http {", f"http {{\n    access_log {workdir}/access.log;", 1)


def render_haproxy(replicas: dict[str, int], port: int) -> str:
    text = _upstreams((DEPLOY / "haproxy.cfg").read_text(), replicas)
    return text.replace("bind :8080", f"bind {LOOPBACK}:{port}")


@dataclass
class Balancer:
    kind: str  # "nginx" | "haproxy"
    port: int
    proc: subprocess.Popen
    workdir: Path
    config: Path = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log(self) -> str:
        return (self.workdir / "output.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_balancer(kind: str, replicas: dict[str, int], workdir: Path) -> Balancer:
    """Run nginx or haproxy (foreground) with the shipped config rendered for ``replicas``
    (name -> loopback port, in lora-1, lora-2, ... order); returns once it accepts connections."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    binary = find_binary(kind)
    if binary is None:
        raise FileNotFoundError(f"{kind} is not installed (apt-get install {kind})")
    config = workdir / ("nginx.conf" if kind == "nginx" else "haproxy.cfg")
    if kind == "nginx":
        config.write_text(render_nginx(replicas, port, workdir))
        cmd = [binary, "-p", str(workdir), "-c", str(config),
               "-g", f"daemon off; pid {workdir}/nginx.pid; error_log {workdir}/error.log info;"]
    else:
        config.write_text(render_haproxy(replicas, port))
        cmd = [binary, "-db", "-f", str(config)]
    with open(workdir / "output.log", "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    balancer = Balancer(kind, port, proc, workdir, config)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{kind} exited with {proc.returncode}: {balancer.log()[-2000:]}")
        with socket.socket() as s:
            if s.connect_ex((LOOPBACK, port)) == 0:
                return balancer
        time.sleep(0.1)
    balancer.stop()
    raise TimeoutError(f"{kind} did not listen on {port}")
