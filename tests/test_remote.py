"""The NDIF code path, offline: remote="local" serializes each trace as a remote run would
(taskvec's own code shipped by value, local modules hidden) and executes it in-process."""

from __future__ import annotations

import torch

from taskvec import mechanism

TEXTS = ["example:a->b\nexample:c->", "example:x->", "example:hot->cold\nexample:up->"]


def test_remote_local_matches_local(tiny_gpt2):
    model = tiny_gpt2
    vectors = torch.randn(len(TEXTS), model.n_layers, model.d_model, generator=torch.Generator().manual_seed(5))
    local = (mechanism.next_tokens(model, TEXTS, return_logits=True), mechanism.hidden_states(model, TEXTS),
             mechanism.patched_next_tokens(model, TEXTS, vectors, [0, 2, 3], return_logits=True))
    model.remote = "local"
    try:
        remote = (mechanism.next_tokens(model, TEXTS, return_logits=True), mechanism.hidden_states(model, TEXTS),
                  mechanism.patched_next_tokens(model, TEXTS, vectors, [0, 2, 3], return_logits=True))
    finally:
        model.remote = False
    for a, b in zip(local, remote):
        torch.testing.assert_close(a, b)
