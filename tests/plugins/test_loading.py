"""Loading: built-ins and entry points, blocking, load failures, `tops-job plugins`."""

from __future__ import annotations

import json
import textwrap
from importlib.metadata import EntryPoint

import pytest

from tops_job import __version__
from tops_job.errors import ExitCode
from tops_job.plugins import manager as plugins


@pytest.fixture
def fake_entry_points(monkeypatch, tmp_path):
    """Entry points in the group `tops_job` as if installed: a good plugin, one whose
    import fails, one implementing a hook that does not exist."""
    (tmp_path / "good_plugin.py").write_text(textwrap.dedent('''
        from tops_job import hookimpl

        @hookimpl
        def tops_job_run_finished(summary, config):
            pass
    '''))
    (tmp_path / "typo_plugin.py").write_text(textwrap.dedent('''
        from tops_job import hookimpl

        @hookimpl
        def tops_job_signr(config):
            pass
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [EntryPoint("good", "good_plugin", "tops_job"),
              EntryPoint("broken", "tops_job_no_such_module_here", "tops_job"),
              EntryPoint("typo", "typo_plugin", "tops_job")]
    monkeypatch.setattr(plugins, "entry_points", lambda group: [p for p in points if p.group == group])
    return points


def test_plugins_command_lists_builtins_with_version_and_hooks(invoke):
    rows = json.loads(invoke("plugins").stdout)
    by_name = {row["name"]: row for row in rows}
    for module_name in plugins.DEFAULT_PLUGINS:
        row = by_name[module_name]
        assert row["status"] == "loaded" and row["builtin"] is True and row["version"] == __version__
        assert row["hooks"] and all(hook.startswith("tops_job_") for hook in row["hooks"])
    assert by_name["tops_job.builtins.local_signer"]["hooks"] == ["tops_job_signer"]


def test_load_failures_are_reported_and_do_not_stop_a_run(fake_entry_points, invoke, isolated_env, caplog):
    rows = {row["name"]: row for row in json.loads(invoke("plugins").stdout)}
    assert rows["good"]["status"] == "loaded" and rows["good"]["hooks"] == ["tops_job_run_finished"]
    assert rows["broken"]["status"] == "failed"
    assert rows["broken"]["error"].startswith("ModuleNotFoundError: No module named 'tops_job_no_such_module_here'")
    assert rows["typo"]["status"] == "failed" and "tops_job_signr" in rows["typo"]["error"]

    result = invoke("run", "--size", "16", "--attempts", "2")
    assert result.exit_code == 0, result.output
    assert "plugin broken failed to load and is left out: ModuleNotFoundError" in result.output
    (summary,) = (isolated_env["data"] / "summaries").glob("*.json")
    failures = json.loads(summary.read_text())["plugin_failures"]
    assert failures == {"broken.load": 1, "typo.load": 1}


def test_a_failed_plugin_that_was_the_configured_submitter_stops_the_run(fake_entry_points, invoke):
    result = invoke("run", "--size", "16", "--attempts", "1", "--submitter", "broken")
    assert result.exit_code == ExitCode.CONFIG_ERROR
    assert "no submitter named 'broken'" in result.output
    assert "plugins that failed to load: broken (ModuleNotFoundError" in result.output


def test_a_failed_plugin_that_was_the_required_signer_stops_the_run(fake_entry_points, invoke, isolated_env):
    result = invoke("run", "--size", "16", "--attempts", "1", env={"TOPS_JOB_SIGNER": "kms"})
    assert result.exit_code == ExitCode.CONFIG_ERROR
    assert "TOPS_JOB_SIGNER: signer 'kms' was asked for but 'local-key' answered" in result.output
    assert "plugins that failed to load: broken" in result.output
    assert not (isolated_env["data"] / "ledger.jsonl").exists()


def test_disable_and_load_variables(fake_entry_points):
    pm = plugins.get_plugin_manager({"TOPS_JOB_DISABLE_PLUGINS": "broken, tops_job.builtins.profile_store"})
    report = pm.load_report
    assert "broken" in report.blocked and "tops_job.builtins.profile_store" in report.blocked
    assert "broken" not in report.failed and not pm.has_plugin("tops_job.builtins.profile_store")
    assert "good" in report.loaded

    only = plugins.get_plugin_manager({"TOPS_JOB_LOAD_PLUGINS": "good"}).load_report
    assert "good" in only.loaded and set(only.blocked) == {"broken", "typo"} and not only.failed
    none = plugins.get_plugin_manager({"TOPS_JOB_LOAD_PLUGINS": ""}).load_report
    assert none.loaded == [name for name in plugins.DEFAULT_PLUGINS]


def test_blocking_a_builtin_turns_its_behaviour_off(invoke):
    result = invoke("run", "--size", "16", "--attempts", "1",
                    env={"TOPS_JOB_DISABLE_PLUGINS": "tops_job.builtins.ledger_submitter"})
    assert result.exit_code == ExitCode.CONFIG_ERROR
    assert "the ledger submitter is disabled" in result.output


def test_a_plugin_that_exits_while_loading_is_left_out(monkeypatch, tmp_path, invoke, isolated_env):
    """An entry point that runs a script's sys.exit/argparse at import is a load failure
    like any other, not the end of the job."""
    (tmp_path / "exiting_plugin.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    points = [EntryPoint("exiting", "exiting_plugin", "tops_job")]
    monkeypatch.setattr(plugins, "entry_points", lambda group: [p for p in points if p.group == group])
    report = plugins.get_plugin_manager().load_report
    assert report.failed == {"exiting": "SystemExit: 3"} and report.loaded == list(plugins.DEFAULT_PLUGINS)
    result = invoke("run", "--size", "16", "--attempts", "1")
    assert result.exit_code == 0, result.output
    assert "plugin exiting failed to load and is left out: SystemExit: 3" in result.output
