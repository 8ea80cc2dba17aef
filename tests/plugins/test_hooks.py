"""Each hook, through a temporary plugin and the real CLI. A test named `test_hook_<hook>…`
counts as that hook's test for test_docs.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import coincurve

from tops_job import hookimpl
from tops_job.compute.autotune import Profile, profile_from_json
from tops_job.delivery.outcomes import Outcome, SubmitResult
from tops_job.errors import ExitCode
from tops_job.observability.events import Reporter
from tops_job.spec.signing import LocalKeySigner


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary_of(isolated_env: dict) -> dict:
    (path,) = (isolated_env["data"] / "summaries").glob("*.json")
    return json.loads(path.read_text())


# ---------------------------------------------------------------- tops_job_signer

class NamedSigner(LocalKeySigner):
    name = "test-signer"


def test_hook_tops_job_signer_plugin_signer_wins_over_the_local_key(register_plugin, invoke, isolated_env, tmp_path):
    secret = coincurve.PrivateKey().secret

    class Plugin:
        @hookimpl
        def tops_job_signer(self, config):
            return NamedSigner(secret)

    register_plugin(Plugin(), "test-signer-plugin")
    out = tmp_path / "r.jsonl"
    result = invoke("run", "--size", "16", "--attempts", "2", "--signer", "test-signer", "--receipts-out", str(out))
    assert result.exit_code == 0, result.output
    expected = coincurve.PrivateKey(secret).public_key.format(compressed=True)
    for receipt in read_jsonl(out):
        assert receipt["pubkey"] == expected.hex()
    assert invoke("verify", str(out)).exit_code == 0
    assert not (isolated_env["config"] / "worker.key").exists()  # the local key was never needed


def test_hook_tops_job_signer_none_leaves_the_local_key_and_failure_stops_the_run(register_plugin, invoke, tmp_path):
    calls = []

    class Quiet:
        @hookimpl
        def tops_job_signer(self, config):
            calls.append(config.run_id)
            return None

    register_plugin(Quiet(), "quiet")
    out = tmp_path / "r.jsonl"
    assert invoke("run", "--size", "16", "--attempts", "1", "--receipts-out", str(out)).exit_code == 0
    assert len(calls) == 1 and len(read_jsonl(out)) == 1

    class Broken:
        @hookimpl
        def tops_job_signer(self, config):
            raise RuntimeError("HSM unplugged")

    register_plugin(Broken(), "broken-signer")
    result = invoke("run", "--size", "16", "--attempts", "1")
    assert result.exit_code == ExitCode.INTERNAL_ERROR
    assert "the signer plugin failed: RuntimeError: HSM unplugged" in result.output


def test_hook_tops_job_signer_failing_sign_digest_is_a_signature_failure(register_plugin, invoke, isolated_env):
    class Flaky(NamedSigner):
        count = 0

        def sign_digest(self, digest):
            Flaky.count += 1
            if Flaky.count == 2:
                raise ConnectionError("signing service hiccup")
            return super().sign_digest(digest)

    class Plugin:
        @hookimpl
        def tops_job_signer(self, config):
            return Flaky(coincurve.PrivateKey().secret)

    register_plugin(Plugin(), "flaky")
    result = invoke("run", "--size", "16", "--attempts", "3")
    summary = summary_of(isolated_env)
    assert summary["attempts"]["by_error_class"] == {"signature": 1}
    assert summary["receipts"]["accepted"] == 2  # the other attempts' receipts are kept
    assert result.exit_code == ExitCode.INTERNAL_ERROR


# ---------------------------------------------------------------- tops_job_register_submitters

class MemorySubmitter:
    name = "memory"

    def __init__(self, store: list):
        self.store = store

    def submit(self, receipt, digest):
        self.store.append(receipt)
        return SubmitResult(Outcome.ACCEPTED, status=200)

    def close(self):
        pass


def test_hook_tops_job_register_submitters_by_name(register_plugin, invoke, isolated_env):
    delivered: list[dict] = []

    class Plugin:
        @hookimpl
        def tops_job_register_submitters(self, register):
            register("memory", lambda config: MemorySubmitter(delivered), schemes=("memory",))

    register_plugin(Plugin(), "memory-submitter")
    result = invoke("run", "--size", "16", "--attempts", "2", "--submitter", "memory", "--drain-timeout", "10")
    assert result.exit_code == 0, result.output
    assert sorted(r["attempt"] for r in delivered) == [0, 1]
    assert not (isolated_env["data"] / "ledger.jsonl").exists()
    unknown = invoke("run", "--size", "16", "--attempts", "1", "--submitter", "nope")
    assert unknown.exit_code == ExitCode.CONFIG_ERROR
    assert "TOPS_JOB_SUBMITTER: no submitter named 'nope'; available:" in unknown.output and "memory" in unknown.output


def test_hook_tops_job_register_submitters_can_replace_a_built_in(register_plugin, invoke, isolated_env):
    """An installed plugin wins over a built-in of the same name, as for every other hook."""
    delivered: list[dict] = []

    class Plugin:
        @hookimpl
        def tops_job_register_submitters(self, register):
            register("http", lambda config: MemorySubmitter(delivered), schemes=("http", "https"))

    register_plugin(Plugin(), "my-http")
    result = invoke("run", "--size", "16", "--attempts", "2", "--aggregator-url", "http://127.0.0.1:9/verify",
                    "--no-challenge", "--drain-timeout", "10")
    assert result.exit_code == 0, result.output
    assert sorted(r["attempt"] for r in delivered) == [0, 1]  # not the built-in, which finds nobody on port 9


def test_hook_tops_job_register_submitters_failure_is_counted(register_plugin, invoke, isolated_env):
    class Broken:
        @hookimpl
        def tops_job_register_submitters(self, register):
            raise ValueError("bad plugin")

    register_plugin(Broken(), "broken-submitters")
    result = invoke("run", "--size", "16", "--attempts", "2")
    assert result.exit_code == 0, result.output  # the ledger still registered and took them
    summary = summary_of(isolated_env)
    assert summary["receipts"]["accepted"] == 2
    assert summary["plugin_failures"] == {"broken-submitters.tops_job_register_submitters": 1}


# ---------------------------------------------------------------- tops_job_register_reporters

class Recorder(Reporter):
    name = "recorder"

    def __init__(self, events):
        self.events = events

    def on_run_start(self, run):
        self.events.append(("start", run.run_id))

    def on_profile(self, profile):
        self.events.append(("profile", profile["source"]))

    def on_attempt(self, event):
        self.events.append(("attempt", event.attempt, event.ok))

    def on_receipt(self, event):
        self.events.append(("receipt", event.outcome))

    def on_run_end(self, summary):
        self.events.append(("end", summary["exit_code"]))


class Exploding(Reporter):
    name = "exploding"

    def on_attempt(self, event):
        raise RuntimeError("dashboard down")


def test_hook_tops_job_register_reporters(register_plugin, invoke, isolated_env):
    events: list[tuple] = []

    class Plugin:
        @hookimpl
        def tops_job_register_reporters(self, register, config):
            register(Recorder(events))
            register(Exploding())

    register_plugin(Plugin(), "reporters")
    result = invoke("run", "--size", "16", "--attempts", "2", env={"TOPS_JOB_RUN_ID": "r-1"})
    assert result.exit_code == 0, result.output
    assert events[0] == ("start", "r-1") and events[1] == ("profile", "--size") and events[-1] == ("end", 0)
    assert [e for e in events if e[0] == "attempt"] == [("attempt", 0, True), ("attempt", 1, True)]
    assert [e for e in events if e[0] == "receipt"] == [("receipt", "accepted")] * 2
    summary = summary_of(isolated_env)
    assert summary["plugin_failures"] == {"exploding": 2}  # counted, and the receipts kept
    assert summary["receipts"]["accepted"] == 2


def test_hook_tops_job_register_reporters_under_another_function_name_is_called_once(
        register_plugin, invoke, isolated_env):
    """pluggy lets a plugin implement a hook under another name (`specname`); it is still
    one implementation, called once, so its reporter sees each event once."""
    events: list[tuple] = []

    class Plugin:
        @hookimpl(specname="tops_job_register_reporters")
        def offer_reporters(self, register, config):
            register(Recorder(events))

    register_plugin(Plugin(), "renamed")
    result = invoke("run", "--size", "16", "--attempts", "2")
    assert result.exit_code == 0, result.output
    assert [e for e in events if e[0] == "attempt"] == [("attempt", 0, True), ("attempt", 1, True)]
    assert [e[0] for e in events].count("start") == 1


# ---------------------------------------------------------------- tops_job_profile_store

class MemoryStore:
    def __init__(self):
        self.saved: dict[str, str] = {}

    def path_for(self, key):
        return f"memory://{key}"

    def load(self, key, expect):
        return profile_from_json(self.saved[key], expect, key) if key in self.saved else None

    def save(self, profile: Profile):
        from dataclasses import asdict

        self.saved[profile.key] = json.dumps(asdict(profile))
        return self.path_for(profile.key)


def test_hook_tops_job_profile_store(register_plugin, invoke, isolated_env):
    store = MemoryStore()

    class Plugin:
        @hookimpl
        def tops_job_profile_store(self, config):
            return store

    register_plugin(Plugin(), "memory-store")
    first = invoke("autotune", "--backend", "numpy", "--target-ms", "5")
    assert first.exit_code == 0, first.output
    line = json.loads(first.output.strip().splitlines()[-1])
    assert line["path"].startswith("memory://numpy-") and len(store.saved) == 1
    assert not list(isolated_env["cache"].glob("profile-*"))  # not in the built-in cache dir
    again = invoke("run", "--backend", "numpy", "--target-ms", "5", "--attempts", "1")
    assert again.exit_code == 0, again.output
    assert f"using cached profile {line['path']}" in again.output


def test_hook_tops_job_profile_store_failure_falls_back_and_is_counted(register_plugin, invoke, isolated_env):
    class Broken:
        @hookimpl
        def tops_job_profile_store(self, config):
            raise OSError("bucket gone")

    register_plugin(Broken(), "broken-store")
    result = invoke("run", "--backend", "numpy", "--target-ms", "5", "--attempts", "1")
    assert result.exit_code == 0, result.output
    assert list(isolated_env["cache"].glob("profile-*.json"))  # the built-in store took over
    assert summary_of(isolated_env)["plugin_failures"] == {"broken-store.tops_job_profile_store": 1}


# ---------------------------------------------------------------- tops_job_register_commands

def test_hook_tops_job_register_commands(register_plugin, invoke):
    import click

    @click.command()
    @click.option("--name", envvar="HELLO_NAME", default="world")
    def hello(name):
        """Say hello."""
        click.echo(f"hello {name}")

    class Plugin:
        @hookimpl
        def tops_job_register_commands(self, cli):
            cli.add_command(hello)

    class Broken:
        @hookimpl
        def tops_job_register_commands(self, cli):
            raise RuntimeError("no commands today")

    register_plugin(Plugin(), "hello")
    register_plugin(Broken(), "broken-commands")
    assert invoke("hello", "--name", "tops").output == "hello tops\n"
    assert "hello" in invoke("--help").output
    assert invoke("verify", "--help").exit_code == 0  # a broken plugin never breaks the CLI


# ---------------------------------------------------------------- tops_job_run_finished

def test_hook_tops_job_run_finished(register_plugin, invoke, isolated_env):
    seen: list[dict] = []

    class Publisher:
        @hookimpl
        def tops_job_run_finished(self, summary, config):
            seen.append(summary)

    class Broken:
        @hookimpl
        def tops_job_run_finished(self, summary, config):
            raise ConnectionError("upload failed")

    register_plugin(Publisher(), "publisher")
    register_plugin(Broken(), "broken-publisher")
    result = invoke("run", "--size", "16", "--attempts", "2")
    assert result.exit_code == 0, result.output
    assert "broken-publisher: hook tops_job_run_finished failed: ConnectionError: upload failed" in result.output
    written = summary_of(isolated_env)
    assert len(seen) == 1 and seen[0]["run_id"] == written["run_id"]
    assert written["plugin_failures"] == {"broken-publisher.tops_job_run_finished": 1}  # rewritten with the count
    assert written["receipts"]["accepted"] == 2


def test_trace_plugins_logs_hook_calls(invoke):
    quiet = invoke("run", "--size", "16", "--attempts", "1")
    assert quiet.exit_code == 0 and "tops_job_signer" not in quiet.output
    traced = invoke("run", "--size", "16", "--attempts", "1", env={"TOPS_JOB_TRACE_PLUGINS": "1"})
    assert traced.exit_code == 0
    assert re.search(r"\[plugins\] +tops_job_signer \[hook\]", traced.output)
    assert "finish tops_job_signer" in traced.output


# ---------------------------------------------------------------- tops_job_outbox

def test_hook_tops_job_outbox_keeps_receipts_where_the_plugin_says(register_plugin, invoke, isolated_env, tmp_path):
    from tests.support.net import free_port
    from tops_job import LocalOutbox

    volume = tmp_path / "volume"
    asked: list = []

    class Plugin:
        @hookimpl
        def tops_job_outbox(self, config):
            asked.append(config.outbox)
            return LocalOutbox(volume)

    register_plugin(Plugin(), "volume-outbox")
    down = f"http://127.0.0.1:{free_port()}/verify"  # nothing listens: every receipt stays pending
    result = invoke("run", "--size", "16", "--attempts", "3", "--protocol", "v1", "--aggregator-url", down,
                    "--drain-timeout", "1")
    assert result.exit_code == int(ExitCode.PENDING), result.output
    assert len(list(volume.glob("*.json"))) == 3
    assert not list((isolated_env["data"] / "outbox").glob("*.json"))  # the built-in directory was not used
    assert summary_of(isolated_env)["delivery"]["outbox"] == str(volume)
    listing = json.loads(invoke("outbox", "--json").output)
    assert listing["outbox"] == str(volume) and len(listing["pending"]) == 3
    # a run without an aggregator counts what waits in the plugin's outbox, never sends it
    ledger = invoke("run", "--size", "16", "--attempts", "1")
    assert ledger.exit_code == int(ExitCode.PENDING), ledger.output
    assert f"3 receipts wait in {volume}" in ledger.output
    assert len(asked) == 3


def test_hook_tops_job_outbox_failure_stops_the_run_and_none_leaves_the_directory(register_plugin, invoke, isolated_env):
    class Declines:
        @hookimpl
        def tops_job_outbox(self, config):
            return None

    register_plugin(Declines(), "declines")
    from tests.support.net import free_port

    down = f"http://127.0.0.1:{free_port()}/verify"
    kept = invoke("run", "--size", "16", "--attempts", "1", "--protocol", "v1", "--aggregator-url", down,
                  "--drain-timeout", "1")
    assert kept.exit_code == int(ExitCode.PENDING), kept.output
    assert len(list((isolated_env["data"] / "outbox").glob("*.json"))) == 1  # the built-in answered

    class Broken:
        @hookimpl
        def tops_job_outbox(self, config):
            raise ConnectionError("bucket unreachable")

    register_plugin(Broken(), "broken-outbox")
    result = invoke("run", "--size", "16", "--attempts", "1", "--protocol", "v1", "--aggregator-url", down)
    assert result.exit_code == int(ExitCode.STORAGE_ERROR), result.output
    assert "the outbox plugin failed: ConnectionError: bucket unreachable" in result.output
    assert len(list((isolated_env["data"] / "outbox").glob("*.json"))) == 1  # nothing fell back to the disk


def test_hook_tops_job_outbox_built_in_stores_offer_every_protocol_member(tmp_path):
    """The directory backend's stores have every member the senders use (runtime_checkable
    protocols check names; mypy checks the signatures of the built-ins)."""
    from tops_job import ExchangeStore, LocalOutbox, OutboxBackend, ReceiptStore

    backend = LocalOutbox(tmp_path / "outbox")
    assert isinstance(backend, OutboxBackend)
    receipts, exchanges = backend.receipts(), backend.exchanges()
    assert isinstance(receipts, ReceiptStore) and isinstance(exchanges, ExchangeStore)
    assert backend.waiting() == 0 and backend.inventory()["outbox"] == str(tmp_path / "outbox")
