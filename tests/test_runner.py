"""The runner and the results cache: validation before compute, cache hits and misses, resuming."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from taskvec import experiment, runner
from taskvec.errors import SettingError
from taskvec.experiment import Protocol, run_main_experiment
from taskvec.runner import ExperimentFileError, load_experiments
from taskvec.store import Store
from taskvec.tasks import load_tasks

ROOT = Path(__file__).parent.parent
TINY = Protocol(n_dev=4, n_test=4, n_baseline=4, single_token=False)
REAL_RUN_TASK = experiment.run_task


def test_shipped_experiment_file_is_valid_and_matches_the_notebooks():
    default, profiles = load_experiments(ROOT / "experiments.yaml")
    assert default == "paper" and {"paper", "tiny"} <= set(profiles)
    for profile in profiles.values():
        runner.check_parameters(profile, ROOT / "nb")


def write_yaml(tmp_path, data) -> Path:
    path = tmp_path / "experiments.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


OK = {"models": ["gemma-3-270m"], "tasks": ["antonyms"], "protocol": {"n_dev": 2}}


@pytest.mark.parametrize("data, problem", [
    ("profiles: [unclosed", "not valid YAML"),
    ({"profiles": {}}, "needs a 'profiles' mapping"),
    ({"profiles": {"p": OK}, "extra": 1}, "unknown top-level key(s) extra"),
    ({"profiles": {"p": {**OK, "modles": ["x"]}}}, "profiles.p: unknown key(s) modles"),
    ({"profiles": {"p": {**OK, "models": []}}}, "profiles.p.models must be a non-empty list"),
    ({"profiles": {"p": {**OK, "tasks": ["antonym"]}}}, "profiles.p.tasks: unknown task(s) antonym"),
    ({"profiles": {"p": {**OK, "protocol": {"n_devs": 3}}}}, "profiles.p.protocol: unknown setting(s) n_devs"),
    ({"profiles": {"p": {**OK, "sections": {"geometri": {}}}}}, "unknown section(s) geometri"),
    ({"profiles": {"p": {**OK, "sections": {"geometry": {"models": []}}}}}, "belong(s) to the profile"),
    ({"default": "q", "profiles": {"p": OK}}, "default profile 'q' is not defined"),
])
def test_malformed_experiment_file(tmp_path, data, problem):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ExperimentFileError) as info:
        load_experiments(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_unknown_notebook_parameter_is_rejected_before_compute(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "sections": {"geometry": {"perplexty": 5}}}}})
    monkeypatch.setattr("taskvec.sections.main_results", lambda *a, **k: pytest.fail("computed before checking"))
    with pytest.raises(SettingError, match="geometry.ipynb has no parameter.*perplexty"):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)


def test_bad_protocol_value_and_unknown_model_are_rejected_before_compute(tmp_path, monkeypatch):
    monkeypatch.setattr("taskvec.sections.main_results", lambda *a, **k: pytest.fail("computed before checking"))
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "protocol": {"n_dev": 0}}}})
    with pytest.raises(SettingError, match="Protocol.n_dev must be >= 1"):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "models": ["gemma-9"]}}})
    with pytest.raises(Exception, match="unknown model 'gemma-9'"):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)
    with pytest.raises(SettingError, match="unknown profile 'nope'"):
        runner.run("nope", path, book_root=tmp_path, build=False, log=lambda *_: None)


def counting(monkeypatch, fail_on: str | None = None) -> list[str]:
    """Record which tasks run_task computes; optionally interrupt on one of them."""
    computed, real = [], REAL_RUN_TASK

    def run_task(model, task, *args, **kwargs):
        if task.name == fail_on:
            raise KeyboardInterrupt
        computed.append(task.name)
        return real(model, task, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_task", run_task)
    return computed


def test_cache_hit_on_same_settings_miss_on_any_change(tiny_gpt2, tmp_path, monkeypatch):
    store = Store(tmp_path / "cache")
    tasks = load_tasks(["next_letter", "to_upper"])
    computed = counting(monkeypatch)
    first = run_main_experiment(tiny_gpt2, tasks, TINY, progress=False, store=store)
    assert computed == ["next_letter", "to_upper"]
    again = run_main_experiment(tiny_gpt2, tasks, TINY, progress=False, store=store)
    assert computed == ["next_letter", "to_upper"]  # nothing recomputed
    cols = ["task", "best_layer", "baseline_acc", "hypothesis_acc", "regular_acc", "n_usable"]
    assert first.accuracy[cols].equals(again.accuracy[cols])
    assert first.predictions.equals(again.predictions)
    assert (first.task_vectors["to_upper"] == again.task_vectors["to_upper"]).all()
    run_main_experiment(tiny_gpt2, tasks, Protocol(n_dev=4, n_test=4, n_baseline=4, seed=7, single_token=False),
                        progress=False, store=store)
    assert computed[2:] == ["next_letter", "to_upper"]  # seed changed: both recomputed
    smaller = [tasks[0].restrict(tasks[0].examples[:-1]), tasks[1]]
    run_main_experiment(tiny_gpt2, smaller, TINY, progress=False, store=store)
    assert computed[4:] == ["next_letter"]  # task data changed: only that task
    tiny_gpt2.weights_sha256, saved = "other-weights", tiny_gpt2.weights_sha256
    try:
        run_main_experiment(tiny_gpt2, tasks[1:], TINY, progress=False, store=store)
    finally:
        tiny_gpt2.weights_sha256 = saved
    assert computed[5:] == ["to_upper"]  # weights changed


def test_interrupted_run_resumes_without_corrupt_entries(tiny_gpt2, tmp_path, monkeypatch):
    store = Store(tmp_path / "cache")
    tasks = load_tasks(["next_letter", "to_upper", "to_lower"])
    counting(monkeypatch, fail_on="to_upper")
    with pytest.raises(KeyboardInterrupt):
        run_main_experiment(tiny_gpt2, tasks, TINY, progress=False, store=store)
    entries = list((tmp_path / "cache" / "main").rglob("DONE"))
    assert len(entries) == 1  # the finished task, whole
    assert not list((tmp_path / "cache").rglob(".tmp-*"))  # no half-written entry
    computed = counting(monkeypatch)
    result = run_main_experiment(tiny_gpt2, tasks, TINY, progress=False, store=store)
    assert computed == ["to_upper", "to_lower"] and len(result.accuracy) == 3


def test_store_write_failure_leaves_nothing(tmp_path):
    store = Store(tmp_path)

    def writer(folder):
        (folder / "half.csv").write_text("a,b")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        store.save("main", "m", "k" * 64, writer)
    assert not store.has("main", "m", "k" * 64) and not list(tmp_path.rglob("*.csv"))
