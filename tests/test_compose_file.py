"""deploy/docker-compose.yml, the Dockerfile and .dockerignore, checked without a container engine
(``make test-container`` builds and runs them for real): the facts the deployment rests on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
REPLICAS = ("lora-1", "lora-2", "lora-3")


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())  # resolves the << merge keys


def test_three_replicas_share_one_adapter_volume_with_healthchecks():
    services = compose()["services"]
    for name in REPLICAS:
        s = services[name]
        assert s["image"] == "lora-server:latest" and s["hostname"] == name
        assert s["volumes"] == ["adapters:/data/adapters"]
        assert "/ready" in " ".join(s["healthcheck"]["test"])
        grace = int(s["stop_grace_period"].removesuffix("s"))
        assert grace > float(s["environment"]["LORA_SERVER_DRAIN_TIMEOUT"])
    assert list(compose()["volumes"]) == ["adapters"]


def test_balancers_mount_the_shipped_configs_and_name_every_replica():
    services = compose()["services"]
    for lb in ("haproxy", "nginx"):
        assert set(services[lb]["depends_on"]) == set(REPLICAS)
        for volume in services[lb]["volumes"]:
            assert (DEPLOY / volume.split(":")[0]).is_file(), volume
    for config in ("haproxy.cfg", "nginx.conf"):
        named = set(re.findall(r"\b(lora-\d+):8000\b", (DEPLOY / config).read_text()))
        assert named == set(REPLICAS), config


def test_image_is_non_root_with_a_healthcheck_and_an_overridable_torch_source():
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^ARG TORCH_INDEX_URL=", dockerfile, re.M)
    assert "${TORCH_INDEX_URL:+--index-url" in dockerfile  # empty: pip's own configuration
    assert re.search(r"^USER 10001$", dockerfile, re.M) and re.search(r"^HEALTHCHECK ", dockerfile, re.M)
    ignore = [line for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line and not line.startswith("#")]
    assert ignore[0] == "*"  # everything is excluded but what the image needs
    assert {line.removeprefix("!").rstrip("/") for line in ignore if line.startswith("!")} == {
        "pyproject.toml", "README.md", "server", "kernels", "adapter_store"}


def test_the_python_the_dockerfile_runs_imports():
    """The build runs ``python -c "from <module> import <name>; ..."`` steps: they must name real code
    (a module moved in the source breaks the image build, not any other test)."""
    import importlib

    dockerfile = (ROOT / "Dockerfile").read_text()
    imports = re.findall(r'python -c "from ([\w.]+) import (\w+)', dockerfile)
    assert imports, "the Dockerfile prebuilds the CPU kernel"
    for module, name in imports:
        assert callable(getattr(importlib.import_module(module), name)), (module, name)


def test_triton_is_an_extra_not_a_dependency():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("triton") for d in project["dependencies"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["cuda"])
    assert any(d.startswith("triton") for d in project["optional-dependencies"]["dev"])  # interpreter tests
