"""AWS Batch files (infra/aws-batch) against botocore's own model of the Batch API.

botocore's validator checks types, required members, lengths and ranges; it does not check
enums, so `check_enums` walks the model for those. Then the retry strategy is checked
against tops_job.errors.ExitCode and the drain timeout against ECS's 30 s stop timeout.
Tool: PyPI `botocore`. No network: only the model bundled with botocore is read.
"""

from __future__ import annotations

import fnmatch
import json

import pytest

from tests.support import INFRA
from tops_job.errors import ExitCode

botocore_session = pytest.importorskip("botocore.session", reason="pip install botocore")
from botocore.validate import validate_parameters  # noqa: E402

BATCH = INFRA / "aws-batch"
FILES = {
    "job-definition.json": "RegisterJobDefinition",
    "submit-array-job.json": "SubmitJob",
    "compute-environment.json": "CreateComputeEnvironment",
}
ECS_STOP_TIMEOUT = 30  # seconds between SIGTERM and SIGKILL (ECS agent default)


@pytest.fixture(scope="module")
def model():
    return botocore_session.get_session().get_service_model("batch")


def load(name: str) -> dict:
    return json.loads((BATCH / name).read_text())


def check_enums(value, shape, path="") -> list[str]:
    problems = []
    if shape.type_name == "structure":
        for key, member in value.items():
            problems += check_enums(member, shape.members[key], f"{path}.{key}")
    elif shape.type_name == "list":
        for i, item in enumerate(value):
            problems += check_enums(item, shape.member, f"{path}[{i}]")
    elif shape.type_name == "map":
        for key, item in value.items():
            problems += check_enums(item, shape.value, f"{path}[{key}]")
    elif getattr(shape, "enum", None) and value not in shape.enum:
        problems.append(f"{path}: {value!r} not one of {shape.enum}")
    return problems


@pytest.mark.parametrize("name", FILES)
def test_file_matches_botocore_model(model, name):
    shape = model.operation_model(FILES[name]).input_shape
    params = load(name)
    validate_parameters(params, shape)  # raises ParamValidationError with every problem
    assert check_enums(params, shape) == []


def test_enum_check_can_fail(model):
    shape = model.operation_model("RegisterJobDefinition").input_shape
    params = load("job-definition.json")
    params["retryStrategy"]["evaluateOnExit"][0]["action"] = "IGNORE"
    assert check_enums(params, shape)


def first_match(rules: list[dict], exit_code: int | None, status_reason: str, reason: str = "") -> str:
    """What Batch does with a failed attempt: the action of the first rule all of whose
    patterns match (glob, `*` at the end); no match means EXIT."""
    facts = {"onExitCode": None if exit_code is None else str(exit_code),
             "onStatusReason": status_reason, "onReason": reason}
    for rule in rules:
        patterns = {k: v for k, v in rule.items() if k != "action"}
        if all(facts[k] is not None and fnmatch.fnmatchcase(facts[k], v) for k, v in patterns.items()):
            return rule["action"].upper()
    return "EXIT"


def test_retry_strategy_follows_exit_codes():
    strategy = load("job-definition.json")["retryStrategy"]
    rules = strategy["evaluateOnExit"]
    assert len(rules) <= 5 and 1 <= strategy["attempts"] <= 10  # Batch's limits
    final = {ExitCode.CONFIG_ERROR, ExitCode.REJECTED}
    for code in set(ExitCode) - {ExitCode.OK}:
        expected = "EXIT" if code in final else "RETRY"
        assert first_match(rules, int(code), "Essential container in task exited") == expected, code
    assert first_match(rules, None, "Host EC2 (instance i-0abc) terminated.") == "RETRY"
    assert first_match(rules, None, "CannotPullContainerError: not found") == "EXIT"


def test_container_fits_the_image_and_stop_timeout():
    definition = load("job-definition.json")
    container = definition["containerProperties"]
    env = {e["name"]: e["value"] for e in container["environment"]}
    # drain + 5 s OTLP export bound + ~2 s to leave the attempt must fit before SIGKILL
    assert float(env["TOPS_JOB_DRAIN_TIMEOUT"]) + 5 + 2 < ECS_STOP_TIMEOUT
    resources = {r["type"]: r["value"] for r in container["resourceRequirements"]}
    assert resources["GPU"] == "1"
    assert container["command"][0] == "run" and "--backend" in container["command"]
    assert container["user"] == "10001"  # the uid of Containerfile.gpu's USER
    assert "USER 10001:0" in (INFRA.parent / "Containerfile.gpu").read_text()  # any group-0 UID works too
    assert {s["name"] for s in container["secrets"]} >= {"WORKER_SK_HEX"}
    assert not any(e["name"] == "WORKER_SK_HEX" for e in container["environment"])
    mounts = {m["containerPath"] for m in container["mountPoints"]}
    assert {"/var/lib/tops-job", "/var/cache/tops-job", "/tmp"} <= mounts
    assert definition["timeout"]["attemptDurationSeconds"] >= 60


def test_array_job_uses_the_definition():
    submit = load("submit-array-job.json")
    assert submit["jobDefinition"] == load("job-definition.json")["jobDefinitionName"]
    assert 2 <= submit["arrayProperties"]["size"] <= 10_000
