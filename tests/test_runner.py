"""The runner and the results cache: validation before compute, cache hits and misses, resuming."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest
import yaml

from taskvec import experiment

from taskvec.publishing import runner
from taskvec.errors import SettingError
from taskvec.experiment import run_main_experiment
from taskvec.settings import Protocol
from taskvec.publishing.runner import ExperimentFileError, load_experiments
from taskvec.store import Store
from taskvec.tasks import load_tasks

ROOT = Path(__file__).parent.parent
TINY = Protocol(n_dev=4, n_test=4, n_baseline=4, single_token=False)
REAL_RUN_TASK = experiment.run_task


def test_shipped_experiment_file_is_valid_and_matches_the_notebooks():
    default, profiles = load_experiments(ROOT / "experiments.yaml")
    assert default == "paper" and {"paper", "tiny"} <= set(profiles)
    for name, profile in profiles.items():
        runner.check_parameters(name, profile, ROOT / "nb")


def test_each_notebook_parameters_cell_is_written_from_its_section_settings():
    """A notebook declares exactly its section's settings, with their defaults and descriptions: the cell is
    what taskvec.publishing.sections.parameters_cell writes (one definition, read by the runner too)."""
    import json

    from taskvec.publishing.sections import SECTIONS, parameters_cell

    assert set(SECTIONS) == {p.stem for p in (ROOT / "nb").glob("*.ipynb")}
    for notebook in SECTIONS:
        cells = json.loads((ROOT / "nb" / f"{notebook}.ipynb").read_text(encoding="utf-8"))["cells"]
        cell = next(c for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
        assert "".join(cell["source"]) == parameters_cell(notebook), notebook


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
    ({"profiles": {"p": {**OK, "sections": {"geometry": {"perplexty": 5}}}}},
     "section geometry has no parameter(s) perplexty"),
    ({"profiles": {"p": {**OK, "sections": {"beyond": {"n_test": 2.5}}}}},
     "section beyond: Beyond.n_test must be an integer, got 2.5"),
    ({"default": "q", "profiles": {"p": OK}}, "default profile 'q' is not defined"),
    ({"profiles": {"p": {**OK, "beside": ["gpt2"]}}}, "profiles.p.beside must map model names"),
    ({"profiles": {"p": {**OK, "beside": {"gpt2": "yes"}}}}, "profiles.p.beside.gpt2 must be true, false or an http(s) URL"),
    # checked by the schema's types (taskvec/publishing/schema.py), each at its key path
    ({"profiles": {"p": {**OK, "protocol": {"n_dev": "many"}}}},
     "profiles.p.protocol.n_dev: Input should be a valid integer, got 'many'"),
    ({"profiles": {"p": {**OK, "protocol": {"dtype": "float16"}}}}, "profiles.p.protocol.dtype: Input should be"),
    ({"profiles": {"p": {**OK, "protocol": {"n_dev": 0}}}},
     "profiles.p.protocol.n_dev: Input should be greater than or equal to 1, got 0"),
    ({"profiles": {"p": {**OK, "protocol": {"n_dev": True}}}}, "profiles.p.protocol.n_dev: Input should be a valid integer"),
    ({"profiles": {"p": {**OK, "protocol": {"template": "{x}"}}}}, "profiles.p.protocol: "),
    ({"profiles": {"p": {"tasks": ["antonyms"]}}}, "profiles.p: missing required key models"),
    ({"profiles": {"p": {**OK, "remote": 1}}}, "profiles.p.remote must be true, false or an http(s) URL"),
])
def test_malformed_experiment_file(tmp_path, data, problem):
    path = write_yaml(tmp_path, data)
    with pytest.raises(ExperimentFileError) as info:
        load_experiments(path)
    assert str(path) in str(info.value) and problem in str(info.value)


def test_every_problem_in_the_file_is_reported_with_its_key_path(tmp_path):
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "tasks": ["antonym"]},
                                              "q": {**OK, "protocol": {"seed": "41", "n_devs": 3}}}})
    with pytest.raises(ExperimentFileError) as info:
        load_experiments(path)
    lines = str(info.value).splitlines()
    assert len(lines) == 2 and lines[0] == f"{path}: profiles.p.tasks: unknown task(s) antonym"
    assert lines[1].startswith(f"{path}: profiles.q.protocol: unknown setting(s) n_devs (allowed: batch_size, ")
    assert lines[1].endswith("; did you mean n_dev?)")


def test_keys_left_empty_take_their_defaults_and_protocol_keeps_only_what_the_file_sets(tmp_path):
    path = write_yaml(tmp_path, "profiles:\n  p:\n    models: [gemma-3-270m]\n    tasks:\n    sections:\n"
                                "    protocol: {seed: 7, n_dev: 3}\n")
    default, profiles = load_experiments(path)
    p = profiles["p"]
    assert default == "p" and (p.tasks, p.sections, p.beside, p.remote, p.description) == ([], {}, {}, False, "")
    assert p.protocol_settings() == {"seed": 7, "n_dev": 3}
    assert p.parameters("geometry", "c")["protocol"] == {"seed": 7, "n_dev": 3}


def test_schema_protocol_is_the_protocol():
    from taskvec.publishing.schema import ProtocolSpec

    assert list(ProtocolSpec.model_fields) == list(Protocol.model_fields)
    assert all(ProtocolSpec.model_fields[name].default == getattr(Protocol(), name) for name in Protocol.model_fields)
    assert all(ProtocolSpec.model_fields[n].description == Protocol.model_fields[n].description
               for n in Protocol.model_fields)


def test_experiment_file_page_is_current():
    """book/experiments.md is what scripts/experiments_doc.py writes from the schema (rerun it after a change)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("experiments_doc", ROOT / "scripts" / "experiments_doc.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    page = (ROOT / "book" / "experiments.md").read_text(encoding="utf-8")
    assert page == module.render(), "book/experiments.md is stale: run .venv/bin/python scripts/experiments_doc.py"
    assert "| `n_dev` | integer | `50` | prompts used to choose L |" in page


def test_unknown_notebook_parameter_is_rejected_before_compute(tmp_path, monkeypatch):
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "sections": {"geometry": {"perplexty": 5}}}}})
    monkeypatch.setattr("taskvec.publishing.sections.main_results", lambda *a, **k: pytest.fail("computed before checking"))
    with pytest.raises(SettingError, match="section geometry has no parameter.*perplexty"):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)


def test_bad_protocol_value_and_unknown_model_are_rejected_before_compute(tmp_path, monkeypatch):
    monkeypatch.setattr("taskvec.publishing.sections.main_results", lambda *a, **k: pytest.fail("computed before checking"))
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "protocol": {"n_dev": 0}}}})
    with pytest.raises(SettingError, match="protocol.n_dev: Input should be greater than or equal to 1"):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)
    path = write_yaml(tmp_path, {"profiles": {"p": {**OK, "models": ["gemma-9"]}}})
    with pytest.raises(Exception, match="unknown model 'gemma-9'"):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)
    with pytest.raises(SettingError, match="unknown profile 'nope'"):
        runner.run("nope", path, book_root=tmp_path, build=False, log=lambda *_: None)


@pytest.mark.parametrize("section, params, problem", [
    ("beyond", {"max_new_tokens": 0}, "section beyond: Beyond.max_new_tokens must be >= 1, got 0"),
    ("beyond", {"long_tasks": ["spel_word"]}, "unknown task.*spel_word"),
    ("beyond", {"run_on": ["smollm2-135m"]}, "run_on names model.*outside the profile's models.*smollm2-135m"),
    ("beyond", {"n_test": 0}, "n_test must be >= 1"),
    ("beyond", {"n_test": "5"}, "n_test must be an integer"),
    ("dominance", {"pairs": [["next_letter"]]}, "each pair names two tasks"),
    ("geometry", {"perplexity": 0.0}, "perplexity must be > 0"),
    ("needs", {"contexts": [1, 64]}, "section needs: .*the largest context count \\(64\\) exceeds pool"),
    ("needs", {"shots": []}, "shots must be a non-empty list"),
    ("needs", {"shots": [1, 2.5]}, "Needs.shots.1 must be an integer"),
    ("needs", {"needs_tasks": ["en_fr"]}, "needs_tasks en_fr are not among the main experiment.s tasks"),
    ("needs", {}, None),  # the defaults: those of the six default tasks the profile runs (here two)
])
def test_bad_section_values_are_rejected_before_compute(tmp_path, monkeypatch, section, params, problem):
    monkeypatch.setattr("taskvec.publishing.sections.main_results", lambda *a, **k: pytest.fail("computed before checking"))
    profile = {**OK, "tasks": ["antonyms", "next_letter"], "sections": {section: params}}
    path = write_yaml(tmp_path, {"profiles": {"p": profile}})
    if problem is None:  # accepted: the run goes on to compute (here: to the patched-out main experiment)
        with pytest.raises(pytest.fail.Exception, match="computed before checking"):
            runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)
        return
    with pytest.raises(SettingError, match=problem):
        runner.run("p", path, book_root=tmp_path, build=False, log=lambda *_: None)


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


def fake_book(tmp_path, monkeypatch, profile: dict) -> tuple[list[str], Path]:
    """An experiment file with one profile, notebooks 'executed' by recording their names (no kernel,
    no compute), and a copy of the tasks folder in ``tmp_path`` (``TASKVEC_TASKS``) to edit."""
    shutil.copytree(ROOT / "tasks", tmp_path / "tasks")
    monkeypatch.setenv("TASKVEC_TASKS", str(tmp_path / "tasks"))
    monkeypatch.setattr("taskvec.publishing.sections.main_results", lambda *a, **k: {})
    executed = []

    def execute(notebook, output, params, key, cwd, line=""):
        executed.append(notebook.stem)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps({"metadata": {"taskvec": {"key": key, "seconds": 0.0}}}))
        return 0.0

    monkeypatch.setattr(runner, "execute", execute)
    return executed, write_yaml(tmp_path, {"profiles": {"p": profile}})


def run_accuracy(path: Path, book_root: Path) -> None:
    runner.run("p", path, book_root=book_root, build=False, only=["accuracy"], log=lambda *_: None)


def local_model(folder: Path) -> str:
    """A folder that resolves as a local model (nothing loads it here)."""
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "gpt2"}')
    return str(folder)


def test_notebook_reruns_when_a_task_file_changes(tmp_path, monkeypatch):
    executed, path = fake_book(tmp_path, monkeypatch, {**OK, "models": [local_model(tmp_path / "m")]})
    run_accuracy(path, tmp_path)
    run_accuracy(path, tmp_path)
    assert executed == ["accuracy"]  # same inputs: the page is up to date
    file = tmp_path / "tasks" / "linguistic" / "antonyms.json"
    data = json.loads(file.read_text())
    data["examples"] = data["examples"][:-5]
    mtime = file.stat().st_mtime
    file.write_text(json.dumps(data))
    os.utime(file, (mtime + 10, mtime + 10))  # a new mtime even on a coarse clock (load_task caches on it)
    run_accuracy(path, tmp_path)
    assert executed == ["accuracy", "accuracy"]  # the task's data changed: re-executed


def test_notebook_reruns_when_any_module_changes(tmp_path, monkeypatch):
    package = tmp_path / "pkg"
    shutil.copytree(ROOT / "taskvec", package, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(runner, "PACKAGE", package)
    executed, path = fake_book(tmp_path, monkeypatch, {**OK, "models": [local_model(tmp_path / "m")]})
    run_accuracy(path, tmp_path)
    run_accuracy(path, tmp_path)
    assert executed == ["accuracy"]
    with open(package / "paper.py", "a") as handle:  # a module no key listed before
        handle.write("\nBEST_LAYER_RELATIVE_DEPTH = (0.2, 0.6)\n")
    run_accuracy(path, tmp_path)
    assert executed == ["accuracy", "accuracy"]


def test_notebook_key_is_stable_and_tracks_the_results_it_reads(tmp_path):
    source, params = ROOT / "nb" / "accuracy.ipynb", {"models": ["m"], "tasks": ["antonyms"], "protocol": {}}
    results = {"m": {"antonyms": "k1"}}
    key = runner._notebook_key(source, params, results)
    assert runner._notebook_key(source, params, results) == key
    assert runner._notebook_key(source, params, {"m": {"antonyms": "k2"}}) != key
    assert runner._notebook_key(source, {**params, "protocol": {"seed": 7}}, results) != key


def test_results_keys_are_the_keys_the_main_experiment_writes(tiny_gpt2, tmp_path):
    """Computed without loading, from a name; the main experiment loads the model and writes the same keys."""
    folder = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    store = Store(tmp_path / "cache")
    keys = runner.results_keys([str(folder)], ["next_letter"], TINY)
    assert not store.has("main", str(folder), keys[str(folder)]["next_letter"])
    run_main_experiment(str(folder), load_tasks(["next_letter"]), TINY, progress=False, store=store)
    assert store.has("main", str(folder), keys[str(folder)]["next_letter"])
    (folder / "tokenizer_config.json").write_text((folder / "tokenizer_config.json").read_text() + "\n")
    assert runner.results_keys([str(folder)], ["next_letter"], TINY) != keys  # a tokenizer file changed


def test_runs_beside_appear_once_cached_and_are_never_computed(tiny_gpt2, tmp_path, monkeypatch):
    """A profile's ``beside`` runs (e.g. NDIF runs of the paper's models) are read from the cache or left out."""
    from taskvec.publishing import sections

    folder = tmp_path / "model"
    tiny_gpt2.hf.save_pretrained(folder)
    tiny_gpt2.tokenizer.save_pretrained(folder)
    cache = str(tmp_path / "cache")
    beside = {str(folder): False, "EleutherAI/gpt-j-6b": True}
    monkeypatch.setattr(sections, "load_model", lambda *a, **k: pytest.fail("a run beside was computed"))
    assert sections.beside_runs(beside, ["next_letter"], TINY, cache) == {}
    assert sections.main_results([], ["next_letter"], TINY, cache, progress=False, beside=beside) == {}
    done = run_main_experiment(str(folder), load_tasks(["next_letter"]), TINY, progress=False, store=Store(cache))
    assert list(sections.beside_runs(beside, ["next_letter"], TINY, cache)) == [str(folder)]
    shown = sections.main_results([], ["next_letter"], TINY, cache, progress=False, beside=beside)
    assert list(shown) == [str(folder)]
    pd.testing.assert_frame_equal(shown[str(folder)].accuracy, done.accuracy)
    assert sections.beside_label("EleutherAI/gpt-j-6b", True) == "EleutherAI/gpt-j-6b (NDIF)"


def test_notebook_kernels_listen_on_private_unix_sockets_not_tcp(tmp_path):
    """runner.execute starts each kernel over IPC in a 0700 folder: its shell, control, stdin, heartbeat and iopub
    channels are Unix sockets no other user can open, and the kernel prints no unencrypted-TCP warning. (ipykernel
    keeps one 127.0.0.1 TCP socket of its own: the pipe for output of forked subprocesses, which carries text
    only and drops any message without the kernel's random 16-byte token.)"""
    import subprocess
    import sys

    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.cells = [nbformat.v4.new_code_cell("x = 1", metadata={"tags": ["parameters"]}),
                nbformat.v4.new_code_cell(
                    "import json, os, stat\nfrom ipykernel.kernelapp import IPKernelApp\napp = IPKernelApp.instance()\n"
                    "folder = os.path.dirname(app.ip)\n"
                    "print(json.dumps({'transport': app.transport, 'x': x, 'mode': oct(stat.S_IMODE(os.stat(folder).st_mode)),"
                    " 'sockets': sorted(n for n in os.listdir(folder) if stat.S_ISSOCK(os.stat(os.path.join(folder, n)).st_mode))}))")]
    source, out = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    script = (f"from pathlib import Path\nfrom taskvec.publishing import runner\n"
              f"runner.execute(Path({str(source)!r}), Path({str(out)!r}), {{'x': 2}}, 'key', Path({str(tmp_path)!r}))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "without encryption" not in done.stderr + done.stdout
    seen = json.loads(nbformat.read(out, as_version=4).cells[-1].outputs[0]["text"])
    assert seen["transport"] == "ipc" and seen["x"] == 2
    assert seen["mode"] == "0o700" and len(seen["sockets"]) == 5  # shell, iopub, stdin, control, heartbeat
