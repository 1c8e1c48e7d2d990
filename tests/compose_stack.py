"""``make test-container``: deploy/docker-compose.yml built and run for real with podman (or docker),
so tests/test_topology.py can run its checks against containers instead of local processes.

A small override file (written here, not shipped) publishes each replica's port and the balancers
on loopback free ports, names the containers, turns the replicas down to one thread each and their
restart policy off (a replica a test stops stays stopped); the
shipped compose file, Dockerfile and balancer configs are used as they are. Docker Hub is not
reachable on the project's machines: base images come from ../shared/container-kit/prepare.sh and
the balancer images from the stand-ins in tests/container/ (built when missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.topology import LOOPBACK, ROOT, free_port, wait_ready
from tests.topology_client import TIMEOUT

PROJECT = "lora-topology-test"
IMAGE = "lora-server:latest"
STANDINS = {"docker.io/library/nginx:1.27": "nginx.Containerfile",
            "docker.io/library/haproxy:2.6": "haproxy.Containerfile"}
REPLICAS = ("lora-1", "lora-2", "lora-3")


def engine() -> str:
    installed = [e for e in ("podman", "docker") if shutil.which(e)]
    found = os.environ.get("CONTAINER_ENGINE") or next(iter(installed), "")
    if not found:
        raise FileNotFoundError("neither podman nor docker is installed")
    return found


def compose_command() -> list[str]:
    if engine() == "docker":
        return ["docker", "compose"]
    tool = shutil.which("podman-compose") or str(Path(sys.executable).parent / "podman-compose")
    if not Path(tool).exists():
        raise FileNotFoundError("podman-compose is not installed (pip install podman-compose)")
    return [tool]


def run(cmd: list[str], timeout: float = 1800, check: bool = True, cwd: Path = ROOT,
        **kw) -> subprocess.CompletedProcess:
    """Run a command; on failure (with ``check``) the error carries the tail of its output."""
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, cwd=cwd, **kw)
    if check and out.returncode != 0:
        tail = (out.stdout + out.stderr)[-4000:]
        raise RuntimeError(f"{' '.join(cmd)} exited with {out.returncode}:\n{tail}")
    return out


@dataclass
class ContainerReplica:
    """A replica container, reached on its published loopback port; ``name`` is its X-Served-By."""

    name: str
    container: str
    url: str

    def alive(self) -> bool:
        out = run([engine(), "inspect", "-f", "{{.State.Running}}", self.container], check=False)
        return out.stdout.strip() == "true"

    def healthy(self) -> bool:
        """Run the image's HEALTHCHECK now (podman runs none on a timer without systemd)."""
        if engine() == "podman":
            return run(["podman", "healthcheck", "run", self.container], check=False).returncode == 0
        out = run(["docker", "inspect", "-f", "{{.State.Health.Status}}", self.container], check=False)
        return out.stdout.strip() == "healthy"

    def terminate(self) -> None:
        run([engine(), "kill", "--signal", "TERM", self.container])

    def kill(self) -> None:
        run([engine(), "kill", "--signal", "KILL", self.container])

    def wait(self, timeout: float = 60) -> int:
        return int(run([engine(), "wait", self.container], timeout=timeout).stdout.split()[0])

    def wait_ready(self, timeout: float = 600) -> None:
        if not wait_ready(self.url, timeout, interval=1):
            raise TimeoutError(f"{self.container} not ready after {timeout} s")


@dataclass
class ContainerBalancer:
    kind: str
    url: str


def _wheels() -> str | None:
    """The machine's local wheel folder (pip's find-links), mounted into the build when present."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.find-links"],
                         capture_output=True, text=True, check=False).stdout.split()
    return out[0] if out and Path(out[0]).is_dir() else None


def build_images() -> None:
    """The server image from the project's Dockerfile, and the balancer stand-ins if missing."""
    cmd = [engine(), "build", "-t", IMAGE]
    if engine() == "podman":
        cmd += ["--format", "docker"]  # keeps the HEALTHCHECK
        if (wheels := _wheels()) is not None:
            cmd += ["-v", f"{wheels}:/wheels:ro", "--build-arg", "TORCH_INDEX_URL="]
    run([*cmd, "."])
    for tag, containerfile in STANDINS.items():
        if run([engine(), "image", "inspect", tag], check=False).returncode != 0:
            run([engine(), "build", "-t", tag, "-f", containerfile, "."], cwd=ROOT / "tests" / "container")


class ComposeStack:
    def __init__(self, workdir: Path, admin_key: str) -> None:
        self.workdir = workdir
        self.ports = {name: free_port() for name in (*REPLICAS, "haproxy", "nginx")}
        # The compose file wants both keys (they must differ); the tests use the admin key.
        self.env = {**os.environ, "LORA_SERVER_API_KEY": f"{admin_key}-inference",
                    "LORA_SERVER_ADMIN_KEY": admin_key,
                    "LORA_LB_ADDR": LOOPBACK, "LORA_LB_PORT": str(self.ports["haproxy"]),
                    "LORA_NGINX_PORT": str(self.ports["nginx"]), "LORA_SERVER_THREADS": "1",
                    "LORA_SERVER_POOL_BYTES": "256MiB"}
        self.override = workdir / "override.yml"

    def _compose(self, *args: str, timeout: float = 1800, check: bool = True) -> subprocess.CompletedProcess:
        files = ["-f", str(ROOT / "deploy" / "docker-compose.yml"), "-f", str(self.override)]
        return run([*compose_command(), "-p", PROJECT, *files, *args], timeout=timeout, env=self.env,
                   check=check)

    def up(self) -> tuple[dict[str, ContainerReplica], dict[str, ContainerBalancer]]:
        # restart "no": a replica the tests SIGTERM or kill stays down, so its exit code can be read.
        # The drain timeout is the tests' patience (topology_client.TIMEOUT), not the shipped 30 s:
        # SmolLM2 on one thread of a busy host can take longer than that to finish the stream that
        # the SIGTERM test expects to end whole (no SIGKILL follows a `kill --signal TERM`).
        env = {"LORA_SERVER_MAX_NUM_SEQS": "4", "LORA_SERVER_DRAIN_TIMEOUT": str(TIMEOUT)}
        services = {name: {"container_name": f"{PROJECT}-{name}", "restart": "no",
                           "ports": [f"{LOOPBACK}:{self.ports[name]}:8000"],
                           "environment": env} for name in REPLICAS}
        services |= {lb: {"container_name": f"{PROJECT}-{lb}"} for lb in ("haproxy", "nginx")}
        self.override.write_text(json.dumps({"services": services}, indent=1))  # JSON is YAML
        self.down()
        self._compose("up", "-d")
        replicas = {f"{n}:8000": ContainerReplica(f"{n}:8000", f"{PROJECT}-{n}",
                                                  f"http://{LOOPBACK}:{self.ports[n]}") for n in REPLICAS}
        for r in replicas.values():
            r.wait_ready()
        balancers = {lb: ContainerBalancer(lb, f"http://{LOOPBACK}:{self.ports[lb]}")
                     for lb in ("nginx", "haproxy")}
        return replicas, balancers

    def logs(self) -> str:
        if not self.override.exists():
            return ""
        out = self._compose("logs", timeout=300, check=False)
        return out.stdout + out.stderr

    def down(self) -> None:
        if self.override.exists():
            self._compose("down", "-v", "-t", "5", timeout=300)
