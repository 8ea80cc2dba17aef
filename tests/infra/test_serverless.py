"""Serverless GPU platforms (infra/cloudrun, infra/azure, infra/modal), each checked by the
platform's own SDK, offline:

- Cloud Run: job.yaml parsed into google-cloud-run's `run_v2.Job` and scheduler.yaml into
  google-cloud-scheduler's `scheduler_v1.Job`, unknown fields refused (protobuf JSON mapping).
- Azure Container Apps: job.json and environment-storage.json walked against the models of
  azure-mgmt-appcontainers: every key a field of its model, types, enum values, required
  fields, no read-only field, and the model's own round trip equal to the file.
- Modal: the app module imported with `modal` (no server is contacted) and its function's
  GPU, image, schedule, timeout, retries, secrets and volumes read back from the SDK.

Then the same rules as for the other schedulers: retries against tops_job.errors.ExitCode,
grace period against the drain, the outbox on storage that outlives the instance, one writer
per outbox, and keys from the platform's secret store.
Tools: PyPI `google-cloud-run`, `google-cloud-scheduler`, `azure-mgmt-appcontainers`, `modal`.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import os
import re
import signal
import sys
import threading
import time
import typing

import pytest
import yaml

from tests.support import INFRA, REPO_ROOT
from tops_job.errors import ExitCode

CLOUDRUN = INFRA / "cloudrun"
AZURE = INFRA / "azure"
MODAL_APP = INFRA / "modal" / "tops_job_app.py"
DATA_DIR = "/var/lib/tops-job"
# Seconds tops-job needs after SIGTERM besides the drain: the telemetry export bound
# (TOPS_JOB_OTEL_EXPORT_TIMEOUT, default 5) and about 2 s to leave the attempt.
OTEL_EXPORT_DEFAULT = 5
LEAVE_ATTEMPT = 2


def cron_gap_hours(expression: str) -> int:
    """Hours between runs of a cron expression of the form `M */N * * *` (the only form
    these files use; anything else fails so that the spacing check cannot be skipped)."""
    match = re.fullmatch(r"(\d{1,2}) \*/(\d{1,2}) \* \* \*", expression)
    assert match, f"{expression!r}: expected 'M */N * * *' (every N hours at minute M)"
    hours = int(match.group(2))
    assert 24 % hours == 0, f"{expression!r}: */{hours} does not divide the day evenly"
    return hours


def readme_exit_table() -> dict[str, list[str]]:
    """Rows of the README's serverless exit-code table, keyed by the `N NAME` first cell."""
    text = (REPO_ROOT / "README.md").read_text()
    section = text.split("### Exit codes on serverless platforms", 1)[1].split("\n### ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and re.fullmatch(r"\d+ [A-Z_]+", cells[0]):
            rows[cells[0]] = cells[1:]
    return rows


def test_readme_maps_every_exit_code_on_every_platform():
    rows = readme_exit_table()
    # One row per ExitCode member: a new code fails here until each platform's outcome is written.
    assert set(rows) == {f"{code.value} {code.name}" for code in ExitCode}
    for name, cells in rows.items():
        assert len(cells) == 4 and all(cells), f"{name}: meaning, Cloud Run, Container Apps, Modal"
        if name.startswith("0 "):
            assert not any("retr" in c.lower() for c in cells[1:]), name
        else:  # none of the three platforms can spare a code from its retry count
            assert all("retr" in c.lower() for c in cells[1:]), name


def test_readme_lists_the_platforms():
    text = (REPO_ROOT / "README.md").read_text()
    choosing = text.split("### Choosing a scheduler", 1)[1].split("\n### ", 1)[0]
    for path in ("infra/cloudrun", "infra/azure", "infra/modal"):
        assert f"`{path}`" in choosing, path
        assert (REPO_ROOT / path / "README.md").is_file(), path


# ---------------------------------------------------------------------------------------
# Google Cloud Run job + Cloud Scheduler trigger
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def run_v2():
    return pytest.importorskip("google.cloud.run_v2", reason="pip install google-cloud-run")


@pytest.fixture(scope="module")
def scheduler_v1():
    return pytest.importorskip("google.cloud.scheduler_v1", reason="pip install google-cloud-scheduler")


def parse_proto(message_class, document: dict):
    """The document as `message_class` (a proto-plus message), unknown fields refused."""
    from google.protobuf import json_format

    pb = message_class.pb()()
    json_format.ParseDict(document, pb, ignore_unknown_fields=False)
    return message_class.wrap(pb)


@pytest.fixture(scope="module")
def cloud_run_job(run_v2):
    return parse_proto(run_v2.Job, yaml.safe_load((CLOUDRUN / "job.yaml").read_text()))


@pytest.fixture(scope="module")
def cloud_scheduler_job(scheduler_v1):
    return parse_proto(scheduler_v1.Job, yaml.safe_load((CLOUDRUN / "scheduler.yaml").read_text()))


def test_cloud_run_files_parse_strictly(cloud_run_job, cloud_scheduler_job):
    from google.protobuf import json_format

    # The parse kept everything: serialised back, the message equals the file.
    for message, name in ((cloud_run_job, "job.yaml"), (cloud_scheduler_job, "scheduler.yaml")):
        back = json_format.MessageToDict(type(message).pb(message))
        assert back == json.loads(json.dumps(yaml.safe_load((CLOUDRUN / name).read_text()))), name


def test_cloud_run_parse_refuses_unknown_fields(run_v2):
    from google.protobuf import json_format

    document = yaml.safe_load((CLOUDRUN / "job.yaml").read_text())
    document["template"]["template"]["containers"][0]["gpu"] = 1  # not a Container field
    with pytest.raises(json_format.ParseError, match="gpu"):
        parse_proto(run_v2.Job, document)
    document = yaml.safe_load((CLOUDRUN / "job.yaml").read_text())
    document["template"]["template"]["timeout"] = "an hour"
    with pytest.raises(json_format.ParseError):
        parse_proto(run_v2.Job, document)


def test_cloud_run_task_retries_timeout_and_gpu(run_v2, cloud_run_job, cloud_scheduler_job):
    execution = cloud_run_job.template
    task = execution.template
    # One task, one writer of the outbox on the bucket.
    assert execution.task_count == 1 and execution.parallelism == 1
    # Cloud Run retries every non-zero exit: CONFIG_ERROR and REJECTED too. One retry.
    assert task.max_retries == 1
    timeout_s = task.timeout.total_seconds()
    assert 60 <= timeout_s <= 3600  # GPU tasks: at most 1 h (GA)
    # Runs never overlap, retries included: another execution would write the same outbox.
    gap_s = cron_gap_hours(cloud_scheduler_job.schedule) * 3600
    assert (task.max_retries + 1) * timeout_s < gap_s
    assert task.node_selector.accelerator == "nvidia-l4"
    (container,) = task.containers
    limits = container.resources.limits
    assert limits["nvidia.com/gpu"] == "1"
    memory = re.fullmatch(r"(\d+)Gi", limits["memory"])
    assert float(limits["cpu"]) >= 4 and memory and int(memory.group(1)) >= 16  # the L4's minimum
    assert list(container.args[:1]) == ["run"] and "cupy" in container.args
    assert not container.command  # the image's ENTRYPOINT (tini) stays
    assert task.execution_environment == run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2


def test_cloud_run_grace_keys_and_outbox(cloud_run_job):
    task = cloud_run_job.template.template
    (container,) = task.containers
    env = {e.name: e for e in container.env}
    drain = float(env["TOPS_JOB_DRAIN_TIMEOUT"].value)
    export = float(env["TOPS_JOB_OTEL_EXPORT_TIMEOUT"].value) if "TOPS_JOB_OTEL_EXPORT_TIMEOUT" in env \
        else OTEL_EXPORT_DEFAULT
    assert drain + export + LEAVE_ATTEMPT < 10  # Cloud Run: SIGKILL 10 s after SIGTERM
    key = env["WORKER_SK_HEX"]
    assert not key.value and key.value_source.secret_key_ref.secret  # Secret Manager
    assert env["TOPS_JOB_DATA_DIR"].value == DATA_DIR
    mounts = {m.mount_path: m for m in container.volume_mounts}
    volumes = {v.name: v for v in task.volumes}
    data = volumes[mounts[DATA_DIR].name]
    # The instance's disk is memory: the outbox must be on a bucket or a file share.
    assert data.gcs.bucket or data.nfs.server, "the data dir must be a GCS or NFS volume"
    if data.gcs.bucket:
        options = dict(o.split("=", 1) if "=" in o else (o, "") for o in data.gcs.mount_options)
        assert options.get("uid") == "10001" and options.get("gid") == "10001"  # the image's user


def test_cloud_scheduler_starts_the_job_once(scheduler_v1, cloud_scheduler_job):
    trigger = cloud_scheduler_job
    job_id = "tops-job"
    assert trigger.http_target.uri.endswith(f"/locations/us-central1/jobs/{job_id}:run")
    assert trigger.http_target.uri.startswith("https://run.googleapis.com/v2/projects/")
    assert trigger.http_target.http_method == scheduler_v1.HttpMethod.POST
    assert trigger.http_target.oauth_token.service_account_email  # no key in the trigger either
    assert trigger.retry_config.retry_count == 0  # a retried jobs.run could start a second execution
    assert trigger.time_zone in {"Etc/UTC", "UTC"}


# ---------------------------------------------------------------------------------------
# Azure Container Apps job
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def azure_models():
    return pytest.importorskip("azure.mgmt.appcontainers.models", reason="pip install azure-mgmt-appcontainers")


def azure_fields(model_class) -> dict[str, tuple[object, list[str]]]:
    """REST name -> (type annotation, visibility) of every field of an Azure model class."""
    module = sys.modules[model_class.__module__]  # azure.mgmt.appcontainers.models._models
    model_class.__new__(model_class)  # the SDK computes the field table on first use
    hints = typing.get_type_hints(model_class, vars(module) | {"_models": sys.modules[module.__package__]})
    return {rf._rest_name: (hints[attr], rf._visibility or [])
            for attr, rf in model_class._attr_to_rest_field.items()}


def check_azure(value, annotation, path: str) -> list[str]:
    """Problems of `value` against a type annotation of the Azure models."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Union:
        options = [a for a in args if a is not type(None)]
        enums = [a for a in options if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums:  # Union[str, SomeEnum]: an extensible enum; only the known values are accepted here
            known = {m.value for m in enums[0]}
            return [] if value in known else [f"{path}: {value!r} not one of {sorted(known)}"]
        (annotation,) = options
        return check_azure(value, annotation, path)
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: expected a list"]
        return [p for i, item in enumerate(value) for p in check_azure(item, args[0], f"{path}[{i}]")]
    if origin is dict:
        if not isinstance(value, dict):
            return [f"{path}: expected an object"]
        return [p for k, item in value.items() for p in check_azure(item, args[1], f"{path}[{k}]")]
    if isinstance(annotation, type) and getattr(annotation, "_is_model", False):  # an SDK model class
        if not isinstance(value, dict):
            return [f"{path}: expected an object ({annotation.__name__})"]
        fields = azure_fields(annotation)
        problems = [f"{path}.{key}: not a field of {annotation.__name__}" for key in value if key not in fields]
        for key, (field_type, visibility) in fields.items():
            optional = type(None) in typing.get_args(field_type)
            if key not in value:
                if not optional:
                    problems.append(f"{path}.{key}: required by {annotation.__name__}")
                continue
            if "create" not in visibility:
                problems.append(f"{path}.{key}: read-only, the service sets it")
            problems += check_azure(value[key], field_type, f"{path}.{key}")
        return problems
    expected = {str: str, int: int, float: (int, float), bool: bool}.get(annotation)
    if expected is None:
        return [f"{path}: no check for {annotation!r}"]
    if not isinstance(value, expected) or (annotation is not bool and isinstance(value, bool)):
        return [f"{path}: {value!r} is not {annotation.__name__}"]
    return []


def load_azure(name: str) -> dict:
    return json.loads((AZURE / name).read_text())


AZURE_FILES = {"job.json": "Job", "environment-storage.json": "ManagedEnvironmentStorage"}


@pytest.mark.parametrize("name", AZURE_FILES)
def test_azure_file_matches_sdk_models(azure_models, name):
    model_class = getattr(azure_models, AZURE_FILES[name])
    document = load_azure(name)
    assert check_azure(document, model_class, model_class.__name__) == []
    # The SDK's own model of the document serialises back to the same JSON.
    assert model_class(document).as_dict() == document


@pytest.mark.parametrize("change, expected", [
    (lambda d: d["properties"]["configuration"].update(retryLimit=1), "not a field of JobConfiguration"),
    (lambda d: d["properties"]["configuration"].update(triggerType="Cron"), "not one of"),
    (lambda d: d["properties"]["configuration"].pop("replicaTimeout"), "required by JobConfiguration"),
    (lambda d: d["properties"].update(provisioningState="Succeeded"), "read-only"),
    (lambda d: d["properties"]["template"]["containers"][0]["resources"].update(cpu="8"), "is not float"),
])
def test_azure_check_can_fail(azure_models, change, expected):
    document = load_azure("job.json")
    change(document)
    problems = check_azure(document, azure_models.Job, "Job")
    assert any(expected in p for p in problems), problems


def test_azure_job_retries_schedule_and_gpu(azure_models):
    job = azure_models.Job(load_azure("job.json"))
    configuration = job.properties.configuration
    assert configuration.trigger_type == azure_models.TriggerType.SCHEDULE
    schedule = configuration.schedule_trigger_config
    # One replica per execution: one writer of the outbox on the share.
    assert schedule.parallelism == 1 and schedule.replica_completion_count == 1
    # Container Apps retries every non-zero exit: CONFIG_ERROR and REJECTED too. One retry.
    assert configuration.replica_retry_limit == 1
    gap_s = cron_gap_hours(schedule.cron_expression) * 3600
    assert (configuration.replica_retry_limit + 1) * configuration.replica_timeout < gap_s
    # Serverless GPU: a Consumption-GPU-* workload profile of the environment, by name.
    assert job.properties.workload_profile_name
    (container,) = job.properties.template.containers
    assert container.args[:1] == ["run"] and "cupy" in container.args
    assert not container.command  # the image's ENTRYPOINT (tini) stays


def test_azure_grace_keys_and_outbox(azure_models):
    job = azure_models.Job(load_azure("job.json"))
    configuration = job.properties.configuration
    (container,) = job.properties.template.containers
    env = {e.name: e for e in container.env}
    # A job's template has no terminationGracePeriodSeconds: Container Apps' 30 s applies.
    assert float(env["TOPS_JOB_DRAIN_TIMEOUT"].value) + OTEL_EXPORT_DEFAULT + LEAVE_ATTEMPT < 30
    secrets = {s.name: s for s in configuration.secrets}
    key = env["WORKER_SK_HEX"]
    assert key.value is None and key.secret_ref in secrets
    for secret in secrets.values():  # Key Vault references only: no value in the file
        assert secret.value is None and secret.key_vault_url.startswith("https://")
        assert ".vault.azure.net/secrets/" in secret.key_vault_url and secret.identity
    assert secrets[key.secret_ref].identity in job.identity.user_assigned_identities
    assert env["TOPS_JOB_DATA_DIR"].value == DATA_DIR
    mounts = {m.mount_path: m for m in container.volume_mounts}
    volumes = {v.name: v for v in job.properties.template.volumes}
    data = volumes[mounts[DATA_DIR].volume_name]
    assert data.storage_type in {azure_models.StorageType.AZURE_FILE, azure_models.StorageType.NFS_AZURE_FILE}
    storage = azure_models.ManagedEnvironmentStorage(load_azure("environment-storage.json"))
    share = storage.properties.azure_file
    assert data.storage_name == share.share_name
    assert share.account_key is None and share.account_key_vault_properties.key_vault_url
    if data.storage_type == azure_models.StorageType.AZURE_FILE:  # SMB: owner set at mount
        options = dict(o.split("=", 1) for o in data.mount_options.split(","))
        assert options["uid"] == "10001" and options["gid"] == "10001"


# ---------------------------------------------------------------------------------------
# Modal
# ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def modal_app():
    pytest.importorskip("modal", reason="pip install modal")
    spec = importlib.util.spec_from_file_location("tops_job_modal_app", MODAL_APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # builds the app's objects locally; nothing is sent
    return module


def test_modal_function_spec(modal_app):
    info = modal_app.run.info()  # local: the function is not hydrated, no server is asked
    assert info.gpus == [("L4", 1)]
    assert info.timeout == modal_app.TIMEOUT_S <= 24 * 3600
    # Modal retries every exception: CONFIG_ERROR and REJECTED too. One retry.
    assert info.max_retries == 1
    assert info.schedule == "Cron('17 */6 * * *', UTC)"
    gap_s = cron_gap_hours(modal_app.SCHEDULE.proto_message.cron.cron_string) * 3600
    assert (info.max_retries + 1) * info.timeout < gap_s
    names = [re.fullmatch(r"modal\.Secret\.from_name\('([^']+)'\)", s) for s in info.secrets]
    assert all(names), info.secrets  # named secrets only: nothing from a dict or the environment
    assert {m.group(1) for m in names} == {"tops-job-key", "tops-job-config"}
    # The outbox directory is a Modal Volume (the container's disk dies with it).
    assert info.volumes[modal_app.DATA_DIR].name == "tops-job-data"
    assert not info.volumes[modal_app.DATA_DIR].read_only
    assert modal_app.ENV["TOPS_JOB_DATA_DIR"] == modal_app.DATA_DIR


def test_modal_image_is_the_gpu_image_recipe(modal_app):
    from modal._utils.async_utils import synchronizer

    # The function runs in the module's image (the SDK's function spec, as `modal shell` reads it).
    assert modal_app.run._spec_.image is synchronizer._translate_in(modal_app.image)
    # ... whose base and Python are those of Containerfile.gpu.
    containerfile = (REPO_ROOT / "Containerfile.gpu").read_text()
    assert f"ARG CUDA_IMAGE={modal_app.CUDA_IMAGE}\n" in containerfile
    assert "ubuntu24.04" in modal_app.CUDA_IMAGE and modal_app.PYTHON == "3.12"


def test_modal_grace_fits(modal_app):
    drain = float(modal_app.ENV["TOPS_JOB_DRAIN_TIMEOUT"])
    assert drain + OTEL_EXPORT_DEFAULT + LEAVE_ATTEMPT < modal_app.GRACE_S <= 30  # Modal: 30 s after preemption
    # The function stops tops-job, and waits out its grace, before Modal's timeout (which
    # comes without a signal), leaving time to commit the Volumes.
    assert 0 < modal_app.STOP_AFTER_S and modal_app.STOP_AFTER_S + modal_app.GRACE_S + 10 <= modal_app.TIMEOUT_S


def tops_job_forever() -> list[str]:
    return [sys.executable, "-m", "tops_job.cli", "run", "--attempts", "1000000",
            "--backend", "numpy", "--size", "64", "--no-challenge"]


def test_modal_wrapper_stops_tops_job_cleanly_at_its_deadline(modal_app, tmp_path):
    summary = tmp_path / "summary.json"
    started = time.monotonic()
    code = modal_app.run_tops_job([*tops_job_forever(), "--summary", str(summary)], dict(os.environ),
                                  stop_after_s=3, grace_s=30)
    assert code == ExitCode.TERMINATED
    assert time.monotonic() - started < 3 + 15
    assert json.loads(summary.read_text())["attempts"]["ok"] >= 1


def test_modal_wrapper_forwards_preemption_to_tops_job(modal_app, tmp_path):
    summary = tmp_path / "summary.json"
    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(3, os.kill, (os.getpid(), signal.SIGINT))  # what Modal sends
    timer.start()
    try:
        code = modal_app.run_tops_job([*tops_job_forever(), "--summary", str(summary)], dict(os.environ),
                                      stop_after_s=60, grace_s=30)
    finally:
        timer.cancel()
    assert code == ExitCode.TERMINATED  # forwarded as SIGTERM; tops-job stopped cleanly
    assert json.loads(summary.read_text())["attempts"]["ok"] >= 1
    assert signal.getsignal(signal.SIGINT) is before  # the handler is put back


# ---------------------------------------------------------------------------------------
# All three
# ---------------------------------------------------------------------------------------

def test_no_literal_key_in_any_file():
    files = [*CLOUDRUN.iterdir(), *AZURE.iterdir(), *MODAL_APP.parent.iterdir()]
    for path in files:
        if path.is_file() and path.suffix in {".yaml", ".json", ".py", ".md"}:
            text = path.read_text()
            assert not re.search(r"\b[0-9a-fA-F]{64}\b", text), f"{path.name}: a 64-hex-digit literal"
            assert not re.search(r"WORKER_SK_HEX\s*[=:]\s*['\"]?[0-9a-fA-F]{8}", text), path.name
