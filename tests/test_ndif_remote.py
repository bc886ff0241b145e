"""taskvec's own code against a real NDIF server (tests/ndif_server.py): remote equals local, and each
failure a user can meet is reported by name and loses nothing.

`remote="local"` cannot prove this: it runs in-process, where taskvec is importable; a real server
has no taskvec, so these requests only work because taskvec ships its source with each of them.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import tiny_model
from taskvec import mechanism, remote
from taskvec.experiment import run_main_experiment
from taskvec.settings import Protocol
from taskvec.models import load_model
from taskvec.store import Store
from taskvec.tasks import load_tasks

pytest_plugins = ["ndif_server"]

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["example:a->b\nexample:c->", "example:x->", "example:hot->cold\nexample:up->", "example:q->"]
KEY = "tv-dummy-key-7f3a9c1e5b-must-not-be-written"


@pytest.fixture(scope="module")
def served(ndif_server):
    """The served tiny Llama, through taskvec's remote loader, and the same model loaded here."""
    import nnsight

    nnsight.CONFIG.APP.REMOTE_LOGGING = False
    return load_model(ndif_server.models["tiny"], remote=ndif_server.host), tiny_model("llama")


def test_remote_equals_local_on_every_operation(served):
    far, near = served
    assert {p.device.type for p in far.hf.parameters()} == {"meta"}  # nothing loaded here
    vectors = torch.randn(len(TEXTS), near.n_layers, near.d_model, generator=torch.Generator().manual_seed(3)) * 3
    dummies = [[t, t + "a"] for t in TEXTS]
    for name, call in {
        "next_tokens": lambda m: mechanism.next_tokens(m, TEXTS, batch_size=2),
        "theta": lambda m: mechanism.task_vectors(m, dummies, batch_size=3),
        "sweep": lambda m: mechanism.patched_next_tokens(m, TEXTS, vectors, range(near.n_layers), batch_size=5),
        "vocab": lambda m: mechanism.vocab_logits(m, vectors[:, 2]),
    }.items():
        a, b = call(far), call(near)
        if a.dtype == torch.long:
            assert a.tolist() == b.tolist(), name  # token ids exactly
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=name)
    # Answers of several tokens: HF generate on the server, θ patched in the prompt's forward only, and the
    # control that writes it at every generated position (a loop over all steps, no early stop).
    for layer, patch in ((None, "prompt"), (1, "prompt"), (1, "every")):
        theta = None if layer is None else vectors[:, layer]
        far_ids = mechanism.generate(far, TEXTS, 5, theta, layer, batch_size=3, patch=patch)
        assert far_ids == mechanism.generate(near, TEXTS, 5, theta, layer, batch_size=3, patch=patch), (layer, patch)


@pytest.mark.parametrize("model_type", ["olmo3", "qwen3_moe"])
def test_new_families_remote_equal_local(ndif_server, model_type):
    """Families beyond the paper's (OLMo 3, a Qwen3 mixture of experts) through the real server: every
    operation, attention heads read and written included, equals the same tiny model run here."""
    from conftest import char_tokenizer
    from families import tiny_family_model
    from taskvec.models import wrap

    far = load_model(ndif_server.models[model_type], remote=ndif_server.host)
    near = wrap(tiny_family_model(model_type), char_tokenizer(), name=f"tiny-{model_type}", weights_sha256="local")
    assert far.arch == near.arch
    generator = torch.Generator().manual_seed(5)
    vectors = torch.randn(len(TEXTS), near.n_layers, near.d_model, generator=generator) * 3
    _, head_dim = near.arch.head_shape(1)
    values = torch.randn(len(TEXTS), 2, head_dim, generator=generator) * 3
    sweep_values = [torch.randn(*near.arch.head_shape(layer), generator=generator) * 3 for layer in (0, 1)]
    for name, call in {
        "next_tokens": lambda m: mechanism.next_tokens(m, TEXTS, batch_size=2),
        "theta": lambda m: mechanism.task_vectors(m, [[t, t + "a"] for t in TEXTS], batch_size=3),
        "sweep": lambda m: mechanism.patched_next_tokens(m, TEXTS, vectors, range(near.n_layers), batch_size=5),
        "vocab": lambda m: mechanism.vocab_logits(m, vectors[:, 1]),
        "heads": lambda m: torch.stack(mechanism.head_outputs(m, TEXTS, [0, 1])),
        "head patch": lambda m: mechanism.head_patched_next_tokens(m, TEXTS, 1, [0, 3], values, return_logits=True),
        "head sweep": lambda m: torch.cat([p.flatten() for p in mechanism.head_sweep_probs(
            m, TEXTS, [5, 6, 7, 8], sweep_values, [0, 1], batch_size=9)]),
        "head contributions": lambda m: mechanism.head_contributions(
            m, [(0, 1), (1, 3), (1, 0)], [sweep_values[0][1], sweep_values[1][3], sweep_values[1][0]],
            context=dict(enumerate(sweep_values))),  # OLMo 3 normalises the attention output: the scale's heads
        "add": lambda m: mechanism.patched_next_tokens(m, TEXTS, vectors, [1], return_logits=True, add=True),
        "theta, heads set": lambda m: mechanism.task_vectors(m, [[t, t + "a"] for t in TEXTS], batch_size=3,
                                                             heads={1: ([0, 3], values[0])}),
    }.items():
        a, b = call(far), call(near)
        if a.dtype == torch.long:
            assert a.tolist() == b.tolist(), name
        else:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * float(b.abs().max()), msg=name)
    assert mechanism.generate(far, TEXTS, 4, vectors[:, 0], 0) == mechanism.generate(near, TEXTS, 4, vectors[:, 0], 0)


def test_heads_study_through_the_server_equals_local(ndif_server):
    """The heads study end to end (means, indirect effects, the FV through OLMo 3's attention-output norm, its
    dev sweep, every condition with the ablations, the cosine) through the real server equals it run here."""
    from conftest import char_tokenizer
    from families import tiny_family_model
    from taskvec.models import wrap
    from taskvec.studies import heads as H
    from taskvec.tasks import Example, Task

    far = load_model(ndif_server.models["olmo3"], remote=ndif_server.host)
    near = wrap(tiny_family_model("olmo3"), char_tokenizer(), name="tiny-olmo3", weights_sha256="local")
    task = Task("upper", "test", "lower to upper", "exact",
                tuple(Example(c, (c.upper(),)) for c in "abcdefghijklmnopqrstuvwxyz"))
    protocol = Protocol(n_shots=3)
    sizes, fv_sizes = H.HeadSizes(n_mean=4, n_corrupt=3), H.FvSizes(ks=[1, 2], n_fv_dev=4, n_fv_test=5, n_ablate=2)
    a, b = (H.run_all(m, [task], protocol, {"upper": 1}, sizes, fv_sizes, progress=False) for m in (far, near))
    torch.testing.assert_close(a.heads["upper"].effect, b.heads["upper"].effect, rtol=1e-4, atol=1e-5)
    for x, y in zip(a.heads["upper"].means + a.heads["upper"].corrupt_means,
                    b.heads["upper"].means + b.heads["upper"].corrupt_means):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4 * float(y.abs().max()))
    assert a.ranking == b.ranking
    fa, fb = a.fv["upper"], b.fv["upper"]
    assert (fa.k, fa.fv_layer) == (fb.k, fb.fv_layer) and fa.cosine == pytest.approx(fb.cosine, abs=1e-4)
    pd.testing.assert_frame_equal(fa.side, fb.side)
    pd.testing.assert_frame_equal(fa.dev, fb.dev)


def test_a_phase_is_one_request(served):
    far, _ = served
    with mechanism.track_usage() as usage:
        mechanism.hidden_states(far, TEXTS * 4, batch_size=2, phase="bundled")  # 8 batches of a prefix and a step
    entry = usage.by_phase["bundled"]
    assert (entry["requests"], entry["traces"]) == (1, 16)


def test_main_experiment_on_gemma_through_the_server_equals_local(ndif_server, real_model, tmp_path):
    """Two tasks of the tiny profile's protocol, through the server and here: identical tables."""
    tasks = load_tasks(["next_letter", "antonyms"])
    protocol = Protocol(n_dev=6, n_test=6, n_baseline=6)
    far = load_model("gemma-3-270m", remote=ndif_server.host)
    remote_result = run_main_experiment(far, tasks, protocol, progress=False, store=Store(tmp_path))
    local_result = run_main_experiment(real_model, tasks, protocol, progress=False)
    columns = ["task", "n_usable", "best_layer", "baseline_acc", "hypothesis_acc", "regular_acc"]
    pd.testing.assert_frame_equal(remote_result.accuracy[columns], local_result.accuracy[columns])
    assert remote_result.predictions["token_id"].tolist() == local_result.predictions["token_id"].tolist()

    # The section pages show the cached remote run beside a local one, read back without the server.
    from taskvec.publishing import sections

    names = [t.name for t in tasks]
    shown = sections.main_results([], names, protocol, str(tmp_path), progress=False,
                                  beside={"gemma-3-270m": ndif_server.host, "EleutherAI/gpt-j-6b": True})
    assert list(shown) == ["gemma-3-270m (NDIF)"]  # gpt-j has no cached result: left out, nothing sent
    pd.testing.assert_frame_equal(shown["gemma-3-270m (NDIF)"].accuracy[columns], local_result.accuracy[columns])


def test_long_answers_on_gemma_through_the_server_equal_local(ndif_server, real_model):
    """One task of Beyond one token through the server and here: the same generated answers."""
    from taskvec.studies import long_answers

    task, protocol = load_tasks(["country_capital"])[0], Protocol(n_dev=4, n_test=4)
    far = load_model("gemma-3-270m", remote=ndif_server.host)
    there = long_answers.run_task(far, task, protocol, 4)
    here = long_answers.run_task(real_model, task, protocol, 4)
    assert there.best_layer == here.best_layer
    columns = ["condition", "query", "generated", "first_token_correct", "full_correct"]
    pd.testing.assert_frame_equal(there.predictions[columns], here.predictions[columns])


def test_an_undeployed_model_is_named(ndif_server, tmp_path):
    folder = tmp_path / "not-served"
    model = tiny_model("gpt2")
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    far = load_model(str(folder), remote=ndif_server.host)
    with remote.where(task="antonyms"), pytest.raises(remote.RemoteRunError) as info:
        mechanism.next_tokens(far, TEXTS[:1], phase="regular")
    message = str(info.value)
    for part in (ndif_server.host, str(folder), "task antonyms", "phase regular"):
        assert part in message, (part, message)


def test_a_server_side_exception_is_surfaced_not_retried(served, ndif_server):
    far, near = served
    wrong = torch.zeros(1, near.n_layers, near.d_model + 1)  # one too wide: fails when written on the server
    with mechanism.track_usage() as usage, pytest.raises(
            remote.RemoteRunError, match=r"failed \(model .*phase boom\): RemoteError: RuntimeError: "
                                         r"The expanded size of the tensor \(32\) must match") as info:
        mechanism.patched_next_tokens(far, TEXTS[:1], wrong, [1], phase="boom")
    assert "Traceback" in info.value.remote_text and "Traceback" not in str(info.value)
    assert usage.by_phase == {}  # one attempt: a failed request is not counted as done


def test_a_request_without_an_answer_in_time_is_named_not_retried(served, monkeypatch):
    """nnsight's blocking wait has no deadline; taskvec polls with one (remote.TIMEOUT_S) and gives up once."""
    far, _ = served
    monkeypatch.setattr(remote, "TIMEOUT_S", 0.0)
    monkeypatch.setattr(remote, "ATTEMPTS", 3)
    real_wait = remote.wait

    class Unanswered:
        """The submitted job as the first poll sees it when the server has not answered yet. On a loaded
        machine the real server can answer before the first poll; hiding that answer keeps the test from
        depending on the race, while the request itself is still sent to the real server."""

        def __init__(self, job):
            self.job = job

        def __call__(self):
            return None

        def __getattr__(self, name):
            return getattr(self.job, name)

    monkeypatch.setattr(remote, "wait", lambda job, *a, **k: real_wait(Unanswered(job), *a, **k))
    with mechanism.track_usage() as usage, pytest.raises(
            remote.RemoteRunError, match=r"timed out \(model .*phase slow\): RequestTimeout: "
                                         r"no result within 0 s \(job [0-9a-f]+, last status"):
        mechanism.next_tokens(far, TEXTS[:1], phase="slow")
    assert usage.by_phase == {}


def test_the_key_is_never_written(ndif_server, tmp_path):
    """A recognizable key in the environment, a whole CLI run against the server: no file it wrote holds it."""
    out, cache = tmp_path / "out", tmp_path / "cache"
    env = {**os.environ, "NDIF_API_KEY": KEY, "NDIF_HOST": ndif_server.host}
    run = subprocess.run([sys.executable, "-m", "taskvec", "main", "--model", ndif_server.models["tiny"], "--remote",
                          "--tasks", "next_letter", "--n-dev", "3", "--n-test", "3", "--n-baseline", "3",
                          "--single-token", "false", "--out", str(out), "--cache-dir", str(cache)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert KEY not in run.stdout + run.stderr
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name == "accuracy.csv" for p in files) and any(p.name == "predictions.jsonl" for p in files)
    assert [p for p in files if KEY.encode() in p.read_bytes()] == []
    # The key did travel: ndif 0.1.2's own API log records it with each request (the server's doing,
    # not ours), which shows this run really sent it.
    assert KEY in (ndif_server.dir / "logs" / "api.log").read_text(errors="replace")


def test_server_down_mid_run_names_the_task_and_a_rerun_resumes(served, ndif_server, tmp_path, monkeypatch):
    """Last in this file: it stops the server. Finished tasks stay cached; the rerun computes only the rest."""
    far, _ = served
    monkeypatch.setattr(remote, "BACKOFF_S", 0.1)
    store, protocol = Store(tmp_path), Protocol(n_dev=3, n_test=3, n_baseline=3, single_token=False)
    first, second = load_tasks(["next_letter", "to_upper"])
    done = run_main_experiment(far, [first], protocol, progress=False, store=store)
    ndif_server.stop()
    try:
        with pytest.raises(remote.RemoteRunError) as info:
            run_main_experiment(far, [first, second], protocol, progress=False, store=store)
        message = str(info.value)
        for part in (ndif_server.host, "task to_upper", "unreachable", "after 3 attempts"):
            assert part in message, (part, message)
    finally:
        ndif_server.start()
    resumed = run_main_experiment(far, [first, second], protocol, progress=False, store=store)
    assert resumed.meta["cached_tasks"] == ["next_letter"]
    pd.testing.assert_frame_equal(resumed.accuracy.iloc[:1].drop(columns="seconds"),
                                  done.accuracy.drop(columns="seconds"))


def test_a_sweep_larger_than_a_request_is_split_and_still_equals_local(ndif_server, real_model):
    """NDIF refuses a request body over 1 MiB: 60 prompts x 18 layers of Gemma's θ are 2.7 MB to send."""
    far = load_model("gemma-3-270m", remote=ndif_server.host)
    texts = [f"example:{chr(97 + i % 26)}->" for i in range(60)]
    vectors = mechanism.hidden_states(real_model, texts)  # any realistic θ: each prompt's own states
    with mechanism.track_usage() as usage:
        got = mechanism.patched_next_tokens(far, texts, vectors, range(far.n_layers), phase="big sweep")
    entry = usage.by_phase["big sweep"]
    assert entry["requests"] >= 4 and entry["rows"] == 60 + 60 * far.n_layers  # each prefix once, a row per layer
    want = mechanism.patched_next_tokens(real_model, texts, vectors, range(real_model.n_layers))
    assert got.tolist() == want.tolist()


def test_a_server_that_refuses_this_client_version_stops_the_run_in_one_line(served, ndif_server, monkeypatch):
    """ndif's API answers 400 when NDIF_MIN_NNSIGHT_VERSION is above the client's nnsight: the first request
    fails with one line that names the host, both versions and what to do, and is not retried."""
    import nnsight

    far, _ = served
    ndif_server.stop()
    monkeypatch.setenv("NDIF_MIN_NNSIGHT_VERSION", "99.0")  # the stack passes NDIF_MIN_* to its processes
    try:
        ndif_server.start(deploy=False)  # the gate sits in front of every model: nothing needs deploying
        with pytest.raises(remote.RemoteRunError) as info:
            mechanism.next_tokens(far, TEXTS)
        message = str(info.value)
        for part in (ndif_server.host, nnsight.__version__, "99.0", "pip install --upgrade nnsight"):
            assert part in message, (part, message)
        assert "\n" not in message and "attempts" not in message  # one line; a refusal is not retried
    finally:
        monkeypatch.delenv("NDIF_MIN_NNSIGHT_VERSION")
        ndif_server.stop()
        ndif_server.start()
    assert mechanism.next_tokens(far, TEXTS).tolist() == mechanism.next_tokens(served[1], TEXTS).tolist()
