"""Shared fixtures: a character tokenizer and tiny random models of every supported family.

Nothing here downloads: configs are built in code, weights are random (seeded).
"""

from __future__ import annotations

import os
import string

# Tests never reach a model hub: everything they load is built in code or installed from PyPI.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers import GPT2Config, GPTJConfig, GPTNeoXConfig, Gemma3TextConfig, LlamaConfig, Qwen2Config

from taskvec.models import wrap

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list(dict.fromkeys(string.ascii_letters + string.digits + string.punctuation + " \n"))


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character, a <bos> in front: enough to build prompts of the real format."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    core.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    core.decoder = decoders.Fuse()  # decode joins characters as they are (no space between tokens)
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


VOCAB = len(SPECIALS) + len(CHARS)
SMALL = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)

# One tiny config per supported family (4 layers, d_model 32). Dropout off so forwards are deterministic.
CONFIGS = {
    "gemma3": lambda: Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                       sliding_window=16, max_position_embeddings=256, **SMALL),
    "llama": lambda: LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, **SMALL),
    "qwen2": lambda: Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                                 num_key_value_heads=2, max_position_embeddings=256, **SMALL),
    "gpt_neox": lambda: GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                      num_attention_heads=4, max_position_embeddings=256, hidden_dropout=0.0,
                                      attention_dropout=0.0, **SMALL),
    "gptj": lambda: GPTJConfig(n_embd=32, n_layer=4, n_head=4, rotary_dim=4, n_positions=256, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0, **SMALL),
    "gpt2": lambda: GPT2Config(n_embd=32, n_layer=4, n_head=4, n_positions=256, resid_pdrop=0.0, embd_pdrop=0.0,
                               attn_pdrop=0.0, **SMALL),
}


def random_causal_lm(config) -> torch.nn.Module:
    """The causal LM of ``config`` with seeded random float32 weights, in eval mode. Random init gives
    near-uniform logits: matrices are scaled up so argmax answers are well separated."""
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return hf.eval()


def tiny_model(family: str, **changes):
    """The tiny random model of ``family``; ``changes`` set config attributes before it is built."""
    config = CONFIGS[family]()
    for key, value in changes.items():
        setattr(config, key, value)
    hf = random_causal_lm(config)
    return wrap(hf, char_tokenizer(), name=f"tiny-{family}", weights_sha256=f"random-init-seed0-x3-{family}")


@pytest.fixture(scope="session", params=sorted(CONFIGS))
def tiny(request):
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def tiny_gpt2():
    return tiny_model("gpt2")


@pytest.fixture(scope="session")
def real_model():
    """The embedded default model (de-quantized and cached on first use, about a minute)."""
    from taskvec.models import load_model

    return load_model("gemma-3-270m")
