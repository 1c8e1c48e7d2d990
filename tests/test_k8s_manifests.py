"""The Kubernetes manifests in deploy/k8s, checked offline: schema validation with
``kubernetes-validate --strict`` (its schemas ship with the package; no cluster, no network), and
the facts that hold them together (names, labels, ports, probe paths, shutdown timing)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
CORE = sorted(K8S.glob("*.yaml"))
OPTIONAL = sorted((K8S / "optional").glob("*.yaml"))


def load(name: str) -> dict:
    (doc,) = [d for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return doc


def test_core_manifests_pass_strict_schema_validation():
    assert {p.name for p in CORE} >= {"deployment.yaml", "service.yaml", "pvc.yaml", "pdb.yaml", "hpa.yaml"}
    r = subprocess.run([sys.executable, "-m", "kubernetes_validate", "--strict", *map(str, CORE)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("passed") == len(CORE), r.stdout


def test_optional_custom_resources_are_well_formed():
    """kubernetes-validate has no schemas for CRDs (it warns and skips them): check what we can."""
    docs = [d for p in OPTIONAL for d in yaml.safe_load_all(p.read_text()) if d]
    kinds = {(d["apiVersion"], d["kind"]): d for d in docs}
    pool = kinds[("inference.networking.k8s.io/v1", "InferencePool")]
    dep = load("deployment.yaml")
    container = dep["spec"]["template"]["spec"]["containers"][0]
    assert pool["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert [p["number"] for p in pool["spec"]["targetPorts"]] == [container["ports"][0]["containerPort"]]
    route = kinds[("gateway.networking.k8s.io/v1", "HTTPRoute")]
    assert route["spec"]["rules"][0]["backendRefs"][0]["name"] == pool["metadata"]["name"]


def test_replicas_share_a_read_write_many_store():
    pvc = load("pvc.yaml")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    dep = load("deployment.yaml")
    pod = dep["spec"]["template"]["spec"]
    assert dep["spec"]["replicas"] > 1 and dep["spec"]["strategy"]["type"] == "RollingUpdate"
    (volume,) = pod["volumes"]
    assert volume["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    mount = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert env["LORA_SERVER_ADAPTER_STORE_DIR"]["value"] == mount[volume["name"]]


def test_probes_and_shutdown_timing():
    """Probes hit the server's own endpoints; the grace period covers preStop plus the drain."""
    pod = load("deployment.yaml")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == c["startupProbe"]["httpGet"]["path"] == "/health"
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    drain = float({e["name"]: e.get("value") for e in c["env"]}["LORA_SERVER_DRAIN_TIMEOUT"])
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + drain
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", ["pdb.yaml", "hpa.yaml", "service.yaml"])
def test_the_others_point_at_the_deployment(name):
    dep = load("deployment.yaml")
    doc = load(name)
    labels = dep["spec"]["template"]["metadata"]["labels"]
    if name == "hpa.yaml":
        assert doc["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        (metric,) = doc["spec"]["metrics"]
        assert metric["pods"]["metric"]["name"] == "lora_server_num_requests_waiting"  # a metric we export
    elif name == "pdb.yaml":
        assert doc["spec"]["selector"]["matchLabels"] == labels
    else:
        assert doc["spec"]["selector"] == labels
        assert doc["spec"]["ports"][0]["targetPort"] == "http"
