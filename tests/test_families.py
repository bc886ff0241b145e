"""Every causal-LM family of the installed transformers: declined with its reason, or golden-tested.

The types come from transformers itself (:func:`families.causal_lm_types`), so a new release's families
are tried automatically. For each type taskvec does not decline, a tiny random model (2 layers, d_model 32)
runs every operation of the method through taskvec and through plain PyTorch, one unpadded prompt at a
time with hooks (:mod:`plain`), and the two must agree: θ of every layer on a cached shared prefix against
a full recompute, batched against one by one; the patched sweep; Regular/Baseline logits; ``generate`` with
θ; the vocabulary read-out; each head's output read and written. The run's outcome per type goes to
``build/families.json``; ``scripts/families.py`` writes the README's list from it, and the last test here
checks the README lists what this run found.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from taskvec import mechanism
from taskvec.arch import DECLINED, LAYOUTS, NO_HEADS, UnsupportedArchitectureError, check_family, resolve
from taskvec.models import wrap

import families
from families import readme_section
from conftest import char_tokenizer
from plain import (plain_attention_share, plain_generate, plain_head_patched_logits, plain_heads, plain_last_hidden, plain_logits,
                   plain_patched_logits)

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "build" / "families.json"
TYPES = families.causal_lm_types()
ATOL, RTOL = 1e-4, 1e-3

# Few-shot prompts as the experiment builds them: a group's texts share their demonstrations (longer than
# the tiny models' sliding window of 8 positions), then differ.
DEMOS = ["example:hot->cold\nexample:up->down\n", "example:a->b\nexample:c->d\n"]
GROUPS = [[DEMOS[0] + "example:in->", DEMOS[0] + "example:wet->"], [DEMOS[1] + "example:e->", DEMOS[1] + "example:gh->"]]
TEXTS = [text for group in GROUPS for text in group]

_OUTCOMES: dict[str, dict] = {}


def _record(model_type: str, status: str, detail: str) -> None:
    _OUTCOMES[model_type] = {"status": status, "detail": detail}


def _declined_reason(model_type: str) -> str:
    stub = type("Config", (), {"model_type": model_type, "is_encoder_decoder": False})()
    with pytest.raises(UnsupportedArchitectureError) as caught:
        check_family(stub)
    return str(caught.value)


def golden(model) -> None:
    """Every operation of the method through taskvec equals plain PyTorch on ``model``."""
    n_layers, d_model = model.n_layers, model.d_model
    # θ of every layer and Regular's next token: shared prefixes cached, batched, against each text alone.
    states, ids = mechanism.prompt_states(model, GROUPS, batch_size=2)
    for g, group in enumerate(GROUPS):
        for t, text in enumerate(group):
            torch.testing.assert_close(states[g, t], plain_last_hidden(model, text), atol=ATOL, rtol=RTOL)
            assert int(ids[g, t]) == int(plain_logits(model, text).argmax())
    # Baseline/Regular logits, batched, left padded.
    logits = mechanism.next_tokens(model, TEXTS, return_logits=True)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(logits[i], plain_logits(model, text), atol=ATOL, rtol=RTOL)
    # The patched sweep: θ after every layer, on one cached prefix per text.
    torch.manual_seed(1)
    vectors = torch.randn(len(TEXTS), n_layers, d_model) * 5
    swept = mechanism.patched_next_tokens(model, TEXTS, vectors, range(n_layers), batch_size=5, return_logits=True)
    for layer in range(n_layers):
        for i, text in enumerate(TEXTS):
            want = plain_patched_logits(model, text, layer, vectors[i, layer])
            torch.testing.assert_close(swept[layer, i], want, atol=ATOL, rtol=RTOL)
    assert not torch.allclose(swept[0], logits, atol=1e-3), "the patch changed nothing"
    # generate with θ written at the prompt's last token.
    stop = set(mechanism.stop_token_ids(model))
    got = mechanism.generate(model, TEXTS, 3, vectors[:, 0], 0, batch_size=8)
    assert got == [plain_generate(model, text, 3, 0, vectors[i, 0], stop) for i, text in enumerate(TEXTS)]
    # The vocabulary read-out of the last layer's state is the model's own next-token logits.
    read = mechanism.vocab_logits(model, states[:, :, -1].reshape(-1, d_model))
    torch.testing.assert_close(read, logits, atol=ATOL, rtol=RTOL)
    # Each head's output before the attention output projection, read and written.
    if model.arch.family in NO_HEADS:
        with pytest.raises(UnsupportedArchitectureError, match="has no per-head access"):
            mechanism.head_outputs(model, TEXTS)
        return
    layer = n_layers - 1
    heads = mechanism.head_outputs(model, TEXTS, [0, layer])
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(heads[0][i], plain_heads(model, text, 0), atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(heads[1][i], plain_heads(model, text, layer), atol=ATOL, rtol=RTOL)
    n_heads, head_dim = model.arch.head_shape(0)
    chosen = [n_heads - 1, 0]
    values = torch.randn(len(TEXTS), 2, head_dim) * 5
    written = mechanism.head_patched_next_tokens(model, TEXTS, 0, chosen, values, batch_size=3, return_logits=True)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(written[i], plain_head_patched_logits(model, text, 0, chosen, values[i]),
                                   atol=ATOL, rtol=RTOL)
    assert not torch.allclose(written, logits, atol=1e-3), "the head write changed nothing"
    # Each head's share of what the last layer's attention adds to the stream (through the block's
    # attention-output norm where it has one): with a text's own heads, the shares sum to it, less the bias.
    n_heads, _ = model.arch.head_shape(layer)
    own = heads[1][0]
    shares = mechanism.head_contributions(model, [(layer, h) for h in range(n_heads)], list(own), {layer: own})
    proj = model.arch.head_module(model.hf, layer)
    with torch.no_grad():
        zero, whole = proj(torch.zeros(1, own.numel()))[0], proj(own.reshape(1, -1))[0]
        gain = torch.ones_like(whole)
        if model.arch.head_norm:
            norm = model.arch.get(model.arch.layer_modules(model.hf)[layer], model.arch.head_norm)
            gain = norm(whole[None, None])[0, 0] / whole
    torch.testing.assert_close(shares.sum(0), plain_attention_share(model, TEXTS[0], layer) - zero * gain,
                               atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("model_type", TYPES)
def test_family(model_type):
    """Declined with its reason, or accepted and equal to plain PyTorch on a tiny random model."""
    if model_type in DECLINED:
        _record(model_type, "declined", DECLINED[model_type])
        assert DECLINED[model_type] in _declined_reason(model_type)
        return
    try:
        hf = families.tiny_family_model(model_type)
    except Exception as error:  # noqa: BLE001 - the report says why no tiny model of it could be built
        first = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        _record(model_type, "untested", f"no tiny model built from generic sizes ({type(error).__name__}: {first})")
        pytest.skip(f"{model_type}: {first}")
    if getattr(hf.config, "is_encoder_decoder", False):
        with pytest.raises(UnsupportedArchitectureError, match="encoder-decoder"):
            resolve(hf)
        _record(model_type, "declined", "an encoder-decoder")
        return
    try:
        model = wrap(hf, char_tokenizer(), name=f"tiny-{model_type}", weights_sha256=f"random-{model_type}")
        golden(model)
    except BaseException as error:
        _record(model_type, "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}")
        raise
    arch = model.arch
    heads = f"no per-head access ({NO_HEADS[model_type]})" if model_type in NO_HEADS else \
        f"heads {arch.attention}.{arch.head_out}"
    _record(model_type, "accepted", f"{arch.layers}, {arch.final_norm}, {arch.unembed}; {heads}"
                                    + (" (explicit layout)" if model_type in LAYOUTS else ""))


def test_the_report_is_written_and_the_readme_lists_it():
    """Runs after every family (file order). With the whole set run, writes build/families.json and checks
    the README's generated list matches it (``python scripts/families.py`` rewrites it)."""
    if set(_OUTCOMES) != set(TYPES):
        pytest.skip("only part of the families ran (-k); the report needs all of them")
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(_OUTCOMES, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    found = re.search(r"<!-- families:start -->\n(.*?)<!-- families:end -->", readme, re.S)
    assert found, "README.md has no families section (<!-- families:start --> ... <!-- families:end -->)"
    assert found.group(1) == readme_section(_OUTCOMES), "README's family list is stale: run python scripts/families.py"
    accepted = [t for t, o in _OUTCOMES.items() if o["status"] == "accepted"]
    assert len(accepted) >= 80, f"only {len(accepted)} families accepted and golden-tested"
