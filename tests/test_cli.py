"""The command line's edges: a missing prompt file, a misspelt boolean, Ctrl-C.

The first two never load a model. The Ctrl-C test runs ``python -m taskvec main`` on a tiny random
model saved to a local folder (no model cache needed), interrupts it once its first task is done and reruns it.
"""

from __future__ import annotations

import json
import math
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from taskvec import cli

from taskvec.publishing import runner
from taskvec.store import Store

REPO = Path(__file__).resolve().parents[1]


def _call(main, argv):
    """``main(argv)``; a KeyboardInterrupt escaping it fails the test (raised, it would stop pytest itself)."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main (a raw traceback for the user)")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any attempt to load weights fails the test."""
    import taskvec.models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(taskvec.models, "load_model", refuse)


def test_missing_prompts_file_is_a_one_line_error(tmp_path, capsys, no_model_load):
    missing = tmp_path / "nowhere" / "prompts.jsonl"
    assert cli.main(["main", "--tasks", "antonyms", "--prompts", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err, err
    assert "No such file" in err and "Traceback" not in err, err


def test_prompts_path_that_is_a_folder_is_a_one_line_error(tmp_path, capsys, no_model_load):
    assert cli.main(["main", "--tasks", "antonyms", "--prompts", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(tmp_path) in err and err.count("\n") == 1, err


@pytest.mark.parametrize("word, value", [("true", True), ("TRUE", True), ("Yes", True), ("1", True),
                                         ("false", False), ("False", False), ("no", False), ("0", False)])
def test_boolean_flags_accept_the_usual_words(word, value):
    for command in ("main", "prompts"):
        ns = cli.build_parser().parse_args([command, "--single-token", word, "--out", "x"])
        assert ns.single_token is value, (command, word)


@pytest.mark.parametrize("word", ["flase", "ture", "", "2", "off"])
def test_boolean_flags_reject_anything_else(word, capsys, no_model_load):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["main", "--tasks", "antonyms", "--single-token", word])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --single-token" in err and repr(word) in err, err


def test_ctrl_c_in_a_command_exits_130_without_traceback(monkeypatch, capsys):
    def interrupted(ns):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_tasks", interrupted)
    assert _call(cli.main, ["tasks"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted: nothing was written", err


def test_ctrl_c_in_the_book_runner_says_what_is_kept(monkeypatch, capsys, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "run", interrupted)
    assert _call(cli.main, ["book", "--cache-dir", str(tmp_path / "results")]) == 130
    err = capsys.readouterr().err
    assert str(tmp_path / "results") in err and "resumes" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) <= 2, err
    monkeypatch.delenv("TASKVEC_CACHE", raising=False)
    assert _call(runner.main, []) == 130
    assert str(Store().root) in capsys.readouterr().err  # the default results cache, named in full


@pytest.fixture(scope="module")
def tiny_model_folder(tmp_path_factory):
    """A random 4-layer GPT-2 with a character tokenizer, saved as a local transformers folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from conftest import CONFIGS, char_tokenizer

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(CONFIGS["gpt2"](), dtype=torch.float32).save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _read_until(proc: subprocess.Popen, pattern: str, timeout_s: float) -> str:
    """stderr of ``proc`` up to the first match of ``pattern`` (tqdm writes \\r, not lines)."""
    seen, deadline = b"", time.monotonic() + timeout_s
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            seen += chunk
            if re.search(pattern, seen.decode(errors="replace")):
                return seen.decode(errors="replace")
    proc.kill()
    raise AssertionError(f"no {pattern!r} in stderr within {timeout_s} s:\n{seen.decode(errors='replace')[-2000:]}")


def test_ctrl_c_in_main_keeps_finished_tasks_and_a_rerun_resumes(tiny_model_folder, tmp_path):
    cache, out = tmp_path / "results", tmp_path / "out"
    tasks = ["next_letter", "prev_letter", "to_upper", "to_lower"]
    cmd = [sys.executable, "-m", "taskvec", "main", "--model", str(tiny_model_folder), "--tasks", ",".join(tasks),
           "--n-dev", "8", "--n-test", "8", "--n-baseline", "8", "--cache-dir", str(cache), "--out", str(out)]
    # The progress bar's postfix names the task being run: once it names the second, the first is cached
    # (its count, "1/4", may never be printed: tqdm refreshes it at most every 0.1 s).
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        before = _read_until(proc, tasks[1] + ":", timeout_s=60)
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = before + rest.decode(errors="replace")
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    message = err.rsplit("interrupted:", 1)[-1]
    assert str(cache) in message and "rerunning the same command resumes" in message, err[-1000:]
    assert not (out / "accuracy.csv").exists()
    done = list(cache.rglob("DONE"))
    assert 1 <= len(done) < len(tasks), done
    assert not [p for p in cache.rglob("*") if p.name.startswith(".tmp-")], "a half-written cache entry was left"

    rerun = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cached_tasks"] and set(meta["cached_tasks"]) < set(tasks), meta  # resumed, did the rest
    assert len(list(cache.rglob("DONE"))) == len(tasks)
    # What it wrote carries each accuracy's uncertainty: its prompts and Wilson interval, and the means'
    # bootstrap intervals over tasks (8 prompts per task: an interval a reader cannot mistake for a fact).
    table = pd.read_csv(out / "accuracy.csv")
    for c in ("baseline", "hypothesis", "regular"):
        assert (table[f"{c}_n"] == 8).all()
        assert ((table[f"{c}_lo"] <= table[f"{c}_acc"]) & (table[f"{c}_acc"] <= table[f"{c}_hi"])).all()
        assert ((table[f"{c}_hi"] - table[f"{c}_lo"]) > 0.2).all()  # 8 prompts: wide, whatever the accuracy
    means = pd.read_csv(out / "means.csv").set_index("condition")
    assert (means["n_tasks"] == len(tasks)).all() and (means["lo"] <= means["mean"]).all()
    assert "[95% CI]" in rerun.stdout and "bootstrap interval over tasks" in rerun.stdout, rerun.stdout


def test_intervals_beside_accuracies_leave_skipped_tasks_blank():
    from taskvec.studies import stats

    accuracy = pd.DataFrame({"task": ["a", "b"], "baseline_acc": [0.5, float("nan")],
                             "hypothesis_acc": [1.0, float("nan")], "regular_acc": [1.0, float("nan")]})
    predictions = pd.DataFrame([{"task": "a", "condition": c, "prompt": i, "correct": ok}
                                for c, oks in (("baseline", [1, 0]), ("hypothesis", [1] * 6), ("regular", [1] * 6))
                                for i, ok in enumerate(oks)])
    table = stats.with_intervals(accuracy, predictions).set_index("task")
    assert table.loc["a", "hypothesis_n"] == 6 and table.loc["a", "hypothesis_hi"] == pytest.approx(1.0)
    assert table.loc["a", "hypothesis_lo"] == pytest.approx(stats.wilson(6, 6)[0]) and table.loc["a", "hypothesis_lo"] < 0.65
    assert math.isnan(table.loc["b", "regular_lo"])
    assert stats.shown(table.loc["b", "regular_acc"], 0, 0) == "-"
    assert list(table.columns[:4]) == ["baseline_acc", "baseline_n", "baseline_lo", "baseline_hi"]
