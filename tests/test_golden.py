"""Golden tests: the nnsight mechanism against plain PyTorch forward hooks, every supported family.

Tolerance: float32 tiny models, ``atol=1e-5, rtol=1e-4`` (batched left-padded vs one prompt
at a time differs only by summation order).
"""

from __future__ import annotations

import pytest
import torch

from taskvec import mechanism
from plain import (plain_attention_share, plain_heads, plain_last_hidden, plain_last_hidden_with_heads,
                   plain_patched_logits)

TEXTS = ["example:a->b\nexample:c->", "example:hot->cold\nexample:up->down\nexample:big->", "example:x->"]
ATOL, RTOL = 1e-5, 1e-4


def test_extraction_matches_plain_forward(tiny):
    got = mechanism.hidden_states(tiny, TEXTS, batch_size=8)
    assert got.shape == (len(TEXTS), tiny.n_layers, tiny.d_model)
    for i, text in enumerate(TEXTS):
        torch.testing.assert_close(got[i], plain_last_hidden(tiny, text), atol=ATOL, rtol=RTOL)


def test_regular_logits_match_plain_forward(tiny):
    got = mechanism.next_tokens(tiny, TEXTS, return_logits=True)
    for i, text in enumerate(TEXTS):
        with torch.no_grad():
            want = tiny.hf(**tiny.tokenizer(text, return_tensors="pt")).logits[0, -1]
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=RTOL)


def test_patch_matches_plain_hook(tiny):
    torch.manual_seed(1)
    vectors = torch.randn(len(TEXTS), tiny.n_layers, tiny.d_model) * 5
    layers = list(range(tiny.n_layers))
    got = mechanism.patched_next_tokens(tiny, TEXTS, vectors, layers, batch_size=5, return_logits=True)
    changed = 0
    for li, layer in enumerate(layers):
        for i, text in enumerate(TEXTS):
            want = plain_patched_logits(tiny, text, layer, vectors[i, layer])
            torch.testing.assert_close(got[li, i], want, atol=ATOL, rtol=RTOL)
            with torch.no_grad():
                clean = tiny.hf(**tiny.tokenizer(text, return_tensors="pt")).logits[0, -1]
            changed += not torch.allclose(want, clean, atol=1e-3)
    # The patch must actually do something (guards against a silent no-op on both sides).
    assert changed == len(layers) * len(TEXTS)


def test_task_vectors_average_dummy_queries(tiny):
    groups = [TEXTS[:2], TEXTS[1:]]
    theta = mechanism.task_vectors(tiny, groups)
    states = mechanism.hidden_states(tiny, TEXTS)
    torch.testing.assert_close(theta[0], states[:2].mean(0))
    torch.testing.assert_close(theta[1], states[1:].mean(0))


# Few-shot prompts as the experiment builds them: each group's dummy and regular prompts share their
# demonstrations (longer than the tiny Gemma 3's sliding window of 16 positions), then differ.
DEMOS = ["example:hot->cold\nexample:up->down\nexample:big->small\n", "example:a->b\nexample:c->d\n"]
GROUPS = [[DEMOS[0] + "example:in->", DEMOS[0] + "example:wet->", DEMOS[0] + "example:yes->"],
          [DEMOS[1] + "example:e->", DEMOS[1] + "example:gh->", DEMOS[1] + "example:x->"]]


def test_shared_prefix_states_and_answers_match_plain_forward(tiny):
    """prompt_states computes each group's demonstrations once and the rest on a cache copy: every text's
    states and next token equal a plain forward of that text alone."""
    states, ids = mechanism.prompt_states(tiny, GROUPS, batch_size=4)  # 2 texts per batch: several caches
    for g, group in enumerate(GROUPS):
        for t, text in enumerate(group):
            torch.testing.assert_close(states[g, t], plain_last_hidden(tiny, text), atol=ATOL, rtol=RTOL)
            with torch.no_grad():
                logits = tiny.hf(**tiny.tokenizer(text, return_tensors="pt")).logits[0, -1]
            assert int(ids[g, t]) == int(logits.argmax())
    theta, regular = mechanism.task_vectors_and_answers(tiny, [g[:2] for g in GROUPS], [g[2] for g in GROUPS])
    torch.testing.assert_close(theta, states[:, :2].mean(1))
    assert regular.tolist() == ids[:, 2].tolist()


def test_a_shared_prefix_is_split_on_token_ids():
    prefix, rest = mechanism.split_shared_prefix([[1, 5, 6, 7], [1, 5, 6, 9, 9], [1, 5, 8]])
    assert prefix == [1, 5] and rest == [[6, 7], [6, 9, 9], [8]]
    prefix, rest = mechanism.split_shared_prefix([[1, 5, 6], [1, 5, 6]])
    assert prefix == [1, 5] and rest == [[6], [6]]  # each text keeps its last token
    with pytest.raises(ValueError, match="share no first token"):
        mechanism.split_shared_prefix([[2, 5], [1, 5]])


def test_the_cached_sweep_recomputes_only_the_last_token(tiny_gpt2):
    """Forward tokens of a sweep: each text once, minus its last token, plus one token per (text, layer)."""
    vectors = torch.zeros(len(TEXTS), tiny_gpt2.n_layers, tiny_gpt2.d_model)
    with mechanism.track_usage() as usage:
        mechanism.patched_next_tokens(tiny_gpt2, TEXTS, vectors, range(tiny_gpt2.n_layers), phase="sweep")
    lengths = [len(tiny_gpt2.tokenizer(t).input_ids) for t in TEXTS]
    expected = sum(n - 1 for n in lengths) + len(TEXTS) * tiny_gpt2.n_layers
    assert usage.by_phase["sweep"]["tokens"] == expected


def test_head_arguments_are_checked_before_any_compute(tiny_gpt2):
    model = tiny_gpt2
    n_heads, head_dim = model.arch.head_shape(0)
    values = torch.zeros(len(TEXTS), 1, head_dim)
    with pytest.raises(ValueError, match=f"heads \\[{n_heads}\\] out of range for layer 0's {n_heads} heads"):
        mechanism.head_patched_next_tokens(model, TEXTS, 0, [n_heads], values)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        mechanism.head_outputs(model, TEXTS, [9])
    with pytest.raises(ValueError, match="values must be"):
        mechanism.head_patched_next_tokens(model, TEXTS, 0, [0, 1], values)
    with pytest.raises(ValueError, match="heads must not repeat"):
        mechanism.head_patched_next_tokens(model, TEXTS, 0, [1, 1], torch.zeros(len(TEXTS), 2, head_dim))


def test_head_sweep_equals_plain_hooks(tiny):
    """Every (layer, head) replaced in turn by a given output, one row each on a cached prefix: the target's
    probability equals a plain forward with a pre-hook on the output projection; the clean row, a plain forward."""
    from plain import plain_head_patched_logits, plain_logits

    torch.manual_seed(2)
    layers = [0, tiny.n_layers - 1]
    values = [torch.randn(*tiny.arch.head_shape(layer)) * 5 for layer in layers]
    targets = [5, 9, 30]
    clean, patched = mechanism.head_sweep_probs(tiny, TEXTS, targets, values, layers, batch_size=7)
    for i, text in enumerate(TEXTS):
        assert clean[i] == pytest.approx(float(plain_logits(tiny, text).softmax(-1)[targets[i]]), rel=1e-4, abs=1e-6)
        for j, layer in enumerate(layers):
            for head in range(tiny.arch.head_shape(layer)[0]):
                want = plain_head_patched_logits(tiny, text, layer, [head], values[j][head:head + 1]).softmax(-1)
                assert patched[i, j, head] == pytest.approx(float(want[targets[i]]), rel=1e-4, abs=1e-6)
    assert not torch.allclose(patched, clean[:, None, None].expand_as(patched), atol=1e-4)


def test_add_mode_adds_to_the_residual_stream(tiny):
    """add=True: θ added to the last token's state after the layer (a function vector's write), against a hook."""
    torch.manual_seed(3)
    vectors = torch.randn(len(TEXTS), tiny.n_layers, tiny.d_model) * 2
    got = mechanism.patched_next_tokens(tiny, TEXTS, vectors, [1], return_logits=True, add=True)[0]
    for i, text in enumerate(TEXTS):
        want = plain_patched_logits(tiny, text, 1, plain_last_hidden(tiny, text)[1] + vectors[i, 1])
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=RTOL)


def test_head_contributions_are_each_heads_share_of_what_attention_adds(tiny):
    """A head's contribution is its slice of the projection applied to its value, without the bias (GPT-2's
    Conv1D and Linear projections alike); where the block normalises the attention output (Gemma 3's
    post-attention norm), that times the norm's weight over the scale of all heads together (``context``).
    With a text's own heads, the shares of all heads sum to what the layer's attention adds to the stream at
    its last token (the norm's output, or the projection's), less the bias."""
    layer = tiny.n_layers - 1
    text = TEXTS[1]
    n_heads, head_dim = tiny.arch.head_shape(layer)
    values = plain_heads(tiny, text, layer)
    context = {layer: values}
    got = mechanism.head_contributions(tiny, [(layer, h) for h in range(n_heads)], list(values), context)
    proj = tiny.arch.head_module(tiny.hf, layer)
    with torch.no_grad():
        zero = proj(torch.zeros(1, n_heads * head_dim))[0]
        whole = proj(values.reshape(1, -1))[0]
        if tiny.arch.head_norm:  # the norm's output over its input: its weight over the scale of all heads
            norm = tiny.arch.get(tiny.arch.layer_modules(tiny.hf)[layer], tiny.arch.head_norm)
            gain = norm(whole[None, None])[0, 0] / whole
            assert tiny.arch.family == "gemma3_text" and not torch.count_nonzero(zero)
        else:
            gain = torch.ones_like(whole)
        for h in range(n_heads):
            alone = torch.zeros(1, n_heads * head_dim)
            alone[0, h * head_dim:(h + 1) * head_dim] = values[h]
            torch.testing.assert_close(got[h], (proj(alone)[0] - zero) * gain, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got.sum(0), plain_attention_share(tiny, text, layer) - zero * gain, atol=1e-4,
                               rtol=1e-4)


def test_a_normed_attention_output_needs_the_heads_context(tiny):
    """Gemma 3 normalises its attention output: a head's share without the other heads' outputs is refused,
    naming the norm; elsewhere no context is needed."""
    n_heads, head_dim = tiny.arch.head_shape(0)
    call = lambda: mechanism.head_contributions(tiny, [(0, 1)], [torch.ones(head_dim)])
    if tiny.arch.head_norm:
        with pytest.raises(ValueError, match="post_attention_layernorm"):
            call()
        with pytest.raises(ValueError, match="context"):
            mechanism.head_contributions(tiny, [(0, 1)], [torch.ones(head_dim)], {0: torch.ones(n_heads + 1, head_dim)})
    else:
        assert call().shape == (1, tiny.d_model)


def test_theta_read_with_heads_set_equals_plain_hooks(tiny):
    """θ read with some heads' last-token outputs set (the heads study's ablated extraction) equals plain
    pre-hooks on each unpadded text, averaged over a prompt's dummies; shared prefixes and batching change
    nothing, and the heads do change θ."""
    torch.manual_seed(6)
    groups = [[t, t + "a"] for t in TEXTS]
    n_heads, head_dim = tiny.arch.head_shape(1)
    values = torch.randn(2, head_dim) * 5
    got = mechanism.task_vectors(tiny, groups, batch_size=3, heads={1: ([n_heads - 1, 0], values)})
    for i, group in enumerate(groups):
        want = torch.stack([plain_last_hidden_with_heads(tiny, t, 1, [n_heads - 1, 0], values) for t in group]).mean(0)
        torch.testing.assert_close(got[i], want, atol=ATOL, rtol=RTOL)
    plain = mechanism.task_vectors(tiny, groups, batch_size=3)
    assert not torch.allclose(got[:, 1:], plain[:, 1:], atol=1e-3)
    torch.testing.assert_close(got[:, 0], plain[:, 0])  # layers before the written one are untouched
    with pytest.raises(ValueError, match="must be"):
        mechanism.task_vectors(tiny, groups, heads={1: ([0], values)})
