"""Invariants of the mechanism that must hold on any model."""

from __future__ import annotations

import nnsight
import torch

from taskvec import mechanism
from taskvec.mechanism import encode, last_token_residual, patch_last_token

TEXTS = [
    "example:q->",
    "example:a->b\nexample:c->d\nexample:e->",
    "example:hot->cold\nexample:up->",
    "example:k,h,f->f\nexample:a,b->",
]


def test_own_task_vector_patched_back_changes_nothing(tiny):
    """θ read from a prompt and written back into the same prompt at any layer leaves its logits unchanged."""
    states = mechanism.hidden_states(tiny, TEXTS)
    clean = mechanism.next_tokens(tiny, TEXTS, return_logits=True)
    layers = list(range(tiny.n_layers))
    patched = mechanism.patched_next_tokens(tiny, TEXTS, states, layers, return_logits=True)
    for li in range(len(layers)):
        torch.testing.assert_close(patched[li], clean, atol=1e-5, rtol=1e-4)


def test_patch_leaves_lower_layers_untouched(tiny_gpt2):
    model = tiny_gpt2
    n = model.n_layers
    target = 2
    enc = encode(model, TEXTS)
    vector = torch.full((model.d_model,), 7.0)
    with torch.no_grad(), model.nn.trace(dict(enc)):
        seen = []
        for layer in range(n):
            if layer == target:
                patch_last_token(model, layer, vector)
            seen.append(last_token_residual(model, layer).clone())
        after = nnsight.save(torch.stack(seen, 1))
    before = mechanism.hidden_states(model, TEXTS)
    torch.testing.assert_close(after[:, :target], before[:, :target], atol=1e-6, rtol=0)
    torch.testing.assert_close(after[:, target], vector.expand(len(TEXTS), -1))
    assert not torch.allclose(after[:, target + 1:], before[:, target + 1:], atol=1e-3)


def test_batch_equals_one_by_one(tiny):
    """Left padding with mask-derived positions: batching changes no answer and no hidden state."""
    batch_ids = mechanism.next_tokens(tiny, TEXTS, batch_size=len(TEXTS))
    batch_states = mechanism.hidden_states(tiny, TEXTS, batch_size=len(TEXTS))
    for i, text in enumerate(TEXTS):
        assert mechanism.next_tokens(tiny, [text])[0] == batch_ids[i]
        torch.testing.assert_close(mechanism.hidden_states(tiny, [text])[0], batch_states[i], atol=1e-5, rtol=1e-4)
    vectors = torch.randn(len(TEXTS), tiny.n_layers, tiny.d_model, generator=torch.Generator().manual_seed(3))
    batched = mechanism.patched_next_tokens(tiny, TEXTS, vectors, [1, 3], batch_size=64)
    for i, text in enumerate(TEXTS):
        single = mechanism.patched_next_tokens(tiny, [text], vectors[i:i + 1], [1, 3], batch_size=1)
        assert torch.equal(single[:, 0], batched[:, i])


def test_batch_size_does_not_change_sweep(tiny_gpt2):
    vectors = torch.randn(len(TEXTS), tiny_gpt2.n_layers, tiny_gpt2.d_model, generator=torch.Generator().manual_seed(4))
    layers = range(tiny_gpt2.n_layers)
    a = mechanism.patched_next_tokens(tiny_gpt2, TEXTS, vectors, layers, batch_size=3, return_logits=True)
    b = mechanism.patched_next_tokens(tiny_gpt2, TEXTS, vectors, layers, batch_size=100, return_logits=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_many_small_batches_equal_one_batch(tiny):
    """Length-sorted batching scatters results back to the caller's order."""
    texts = TEXTS * 3
    one = mechanism.hidden_states(tiny, texts, batch_size=len(texts))
    many = mechanism.hidden_states(tiny, texts, batch_size=2)
    torch.testing.assert_close(one, many, atol=1e-5, rtol=1e-4)
    assert torch.equal(mechanism.next_tokens(tiny, texts, batch_size=1), mechanism.next_tokens(tiny, texts))


def test_a_text_given_several_times_with_different_thetas_answers_as_each_alone(tiny):
    """Repeated texts share one cached prefix row; each row still gets its own θ."""
    texts = [TEXTS[1], TEXTS[1], TEXTS[0], TEXTS[1], TEXTS[0]]
    vectors = torch.randn(len(texts), tiny.n_layers, tiny.d_model, generator=torch.Generator().manual_seed(5)) * 5
    batched = mechanism.patched_next_tokens(tiny, texts, vectors, [1, 2], batch_size=64, return_logits=True)
    for i, text in enumerate(texts):
        single = mechanism.patched_next_tokens(tiny, [text], vectors[i:i + 1], [1, 2], return_logits=True)
        torch.testing.assert_close(single[:, 0], batched[:, i], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(batched[:, 0], batched[:, 1], atol=1e-3)  # same text, other θ, other answer
