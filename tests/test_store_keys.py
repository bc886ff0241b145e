"""Cache keys cover what changes a result: placement (device, dtype), library versions, hub revision,
a local model's tokenizer. Nothing here loads real weights or reaches a hub."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from taskvec import experiment, models, store
from taskvec.experiment import run_main_experiment
from taskvec.settings import Protocol
from taskvec.store import Store, make_key
from taskvec.tasks import load_task, load_tasks

from conftest import CONFIGS, char_tokenizer, tiny_model

TINY = Protocol(n_dev=4, n_test=4, n_baseline=4, single_token=False)


def test_placement_is_decided_without_loading():
    assert models.placement("gemma-3-270m") == ("cpu", "float32")  # embedded: CPU, float32
    assert models.placement("org/model", "cuda", "bfloat16") == ("cuda", "bfloat16")
    assert models.placement("org/model", "cuda:1", torch.float16) == ("cuda", "float16")  # type, not index


def test_device_and_dtype_are_in_the_main_key(monkeypatch):
    task, protocol = load_task("next_letter"), Protocol()
    where = models.placement("org/model")
    keys = {}
    for device in ("cpu", "cuda"):
        for dtype in ("float32", "bfloat16"):
            monkeypatch.setattr(models, "placement", lambda *a, d=device, t=dtype, **k: (d, t))
            keys[(device, dtype)] = experiment.main_keys("org/model", [task], protocol)[task.name]
    monkeypatch.undo()
    assert len(set(keys.values())) == 4
    # A name alone is keyed where load_model would put it.
    assert experiment.main_keys("org/model", [task], protocol)[task.name] == keys[where]


def test_same_model_in_bf16_is_not_a_cache_hit(tmp_path, monkeypatch):
    cache = Store(tmp_path)
    tasks = load_tasks(["next_letter"])
    computed, real = [], experiment.run_task

    def run_task(model, task, *args, **kwargs):
        computed.append(next(model.hf.parameters()).dtype)
        return real(model, task, *args, **kwargs)

    monkeypatch.setattr(experiment, "run_task", run_task)
    fp32 = tiny_model("gpt2")
    bf16 = tiny_model("gpt2")  # same name and weights hash
    bf16.hf.to(torch.bfloat16)
    run_main_experiment(fp32, tasks, TINY, progress=False, store=cache)
    run_main_experiment(bf16, tasks, TINY, progress=False, store=cache)
    run_main_experiment(bf16, tasks, TINY, progress=False, store=cache)
    assert computed == [torch.float32, torch.bfloat16]  # bf16 computed once, then reused


def test_library_versions_are_in_every_key(monkeypatch):
    installed = store.library_versions()
    assert set(installed) == {"torch", "transformers", "nnsight"}
    before = make_key(kind="x", value=1)
    assert make_key(kind="x", value=1) == before
    monkeypatch.setattr(store, "library_versions", lambda: {**installed, "transformers": "0.0.1"})
    assert make_key(kind="x", value=1) != before


def test_local_fingerprint_covers_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    (tmp_path / "tokenizer.json").write_text('{"vocab": {"a": 0}}')
    (tmp_path / "generation_config.json").write_text('{"do_sample": false}')
    (tmp_path / "model.safetensors").write_bytes(b"\0" * 64)
    first = models.model_fingerprint(str(tmp_path))
    assert models.model_fingerprint(str(tmp_path)) == first
    (tmp_path / "tokenizer.json").write_text('{"vocab": {"b": 0}}')
    changed = models.model_fingerprint(str(tmp_path))
    assert changed != first
    (tmp_path / "generation_config.json").write_text('{"do_sample": true}')
    assert models.model_fingerprint(str(tmp_path)) not in (first, changed)


def test_hub_fingerprint_names_the_revision():
    assert models.model_fingerprint("org/model") == "hub:org/model@main"
    assert models.model_fingerprint("org/model", "0123abc") == "hub:org/model@0123abc"
    assert models.model_fingerprint("org/model", "0123abc") != models.model_fingerprint("org/model", "4567def")


def test_load_model_passes_the_revision_through(monkeypatch):
    calls = {}

    def recording(what, make):
        def from_pretrained(path, **kwargs):
            calls[what] = (str(path), kwargs)
            return make()

        return from_pretrained

    monkeypatch.setattr("transformers.AutoConfig.from_pretrained", recording("config", CONFIGS["llama"]))
    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained",
                        recording("model", lambda: AutoModelForCausalLM.from_config(CONFIGS["llama"]())))
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", recording("tokenizer", char_tokenizer))
    model = models.load_model("org/model", device="cpu", revision="0123abc")
    assert {what: (path, kwargs["revision"]) for what, (path, kwargs) in calls.items()} == {
        what: ("org/model", "0123abc") for what in ("config", "model", "tokenizer")}
    assert calls["model"][1]["dtype"] == getattr(torch, models.placement("org/model", "cpu")[1])
    assert model.weights_sha256 == "hub:org/model@0123abc" and model.info["revision"] == "0123abc"
