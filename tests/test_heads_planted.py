"""The heads study (taskvec.studies.heads) on a model with one planted task-carrying head.

Random tiny models carry no task, so the heads study on them cannot tell a right method from a wrong
one. Here a two-layer GPT-2 with hand-set weights does a to-upper task (``c -> C``) in context through
exactly one attention head, (layer 1, head 2), so the head the study must find, and what its function
vector must do, are known by construction.

Why the head must read pairs, not content
-----------------------------------------
The corrupted prompts of the indirect effect are :func:`~taskvec.studies.heads.shuffled_labels`: the
same demonstrations with their answers deranged among themselves. A corrupted prompt holds the same
multiset of tokens as its clean one, so a head that only averages token content (e.g. "which answers
occur") has the same output on both, and setting it to its clean mean changes little: it cannot carry the
task in the sense of the study. The planted head therefore reads a feature that is on only where a
demonstration's answer *is the answer of its own input* (a correct pair), and a derangement removes every
correct pair. The model has such a content head as a decoy, (layer 1, head 0): it attends to the same
positions as the planted head and copies the answers' identities (which the unembedding reads, a little).

The construction (d_model 48, 3 heads of 16 per layer, ReLU MLPs, one dimension per feature)
--------------------------------------------------------------------------------------------
Task letters ``bcdfghijkn`` (none occurs in ``example:``), task ``c -> C``. Prompts are the default
format, ``example:b->B\\nexample:f->F\\n...example:h->``, one token per character (conftest's tokenizer).

- Embeddings: a task letter ``c`` -> ``LF`` and ``ID_c``; its uppercase ``C`` -> ``UF`` and ``IDU_c``;
  ``<bos>`` -> ``BOS``; position p -> ``POS = 0.01 p``. Everything else 0.
- LayerNorms are made linear: ``layer_norm_epsilon`` 1e6 and weight 1000 give LN(h) = centred h up to a
  relative 1e-6 (every residual here has variance below 1), and every vector any part reads sums to zero
  (``e_i - e_DUMP``, DUMP a dimension nothing writes), so reading the centred h is reading h.
- Layer 0, head 0, the *gatherer*: score ``2000 LF_key + 10 p_key`` (unscaled attention), so every token
  attends to the most recent task letter (a demonstration's answer sits three tokens after its input,
  ``c->C``: a margin of 1970 over any non-letter token, and over 100 over the previous line's letter); it
  copies ``ID_c`` into ``P_c``. At an answer token ``P`` names its demonstration's input; at the query's
  ``>``, the query letter.
- Layer 0 MLP, the *pairing gate*: one ReLU unit per letter, ``relu(IDU_c + P_c - 1.5)``, written twice
  into ``FLAG``. It is 1 exactly at an answer that is its own input's uppercase; a shuffled answer (``c->D``)
  gives ``relu(1 + 0 - 1.5) = 0`` in both units it half-matches.
- Layer 1, head 2, the *planted head*: score ``50 UF_key``: attends evenly to the answer tokens (to all
  tokens evenly when there is none) and copies ``FLAG`` into ``T``. So at the last token T is the share of
  correct pairs among the demonstrations: 1 on an in-context prompt, 0 on a shuffled one or a query alone.
- Layer 1, head 0, the *content decoy*: the same attention, copying ``IDU_c`` into ``A_c`` (which answers
  occur). Layer 1, head 1, the *constant decoy*: attends to ``<bos>`` and writes 5 into ``CONST``, which
  nothing reads (a large, useless head output). Layer 0, heads 1 and 2: zero. Layer 1 MLP: zero.
- Unembedding (untied), at scale S = 8: lowercase ``c``: ``1.5 S P_c``; uppercase ``C``:
  ``S (P_c + T + A_c)``; every other token 0.

So for query ``x`` (never among its prompt's demonstrations, so ``A_x = 0``): with T = 1 the answer is ``X``
(2S against 1.5S for the echo ``x`` and at most 1.2S for another uppercase letter), with T = 0 it is ``x``
(1.5S against S for ``X``). The model does the task in context, echoes the query alone and on a
shuffled prompt; setting the planted head to its clean mean (T = 1) on a shuffled prompt raises P(X) from
about 0.02 to about 0.97, and every other head moves it by a few hundredths at most. The planted head's
function vector is ``T = 1`` (its mean output through ``c_proj``); added after its own layer (taskvec's
``patched_next_tokens`` writes after the layer, i.e. where the head's write has already landed; layer 1's
MLP reads nothing of it) to a query alone it makes the model answer ``X``. The other heads' vectors do not.

Knock-outs (the flip side): with the planted head's weights zeroed, or the pairing gate removed (the task
"not present": the head still attends, but there is no pair feature to copy), the model no longer does the
task in context, and the planted head has no effect and no working function vector.
"""

from __future__ import annotations

import pytest
import torch

from taskvec import mechanism
from taskvec.models import TaskModel, wrap
from taskvec.prompts import PromptFormat, sample_prompts, sample_queries
from taskvec.studies import heads as H
from taskvec.tasks import Example, Task

from conftest import char_tokenizer
from planted import linear_gpt2

LETTERS = "bcdfghijkn"
N_LAYERS, N_HEADS, HEAD_DIM = 2, 3, 16
D_MODEL = N_HEADS * HEAD_DIM
PLANTED = (1, 2)  # (head, layer) swapped is no head; a slice at head 0 or 1 is a decoy's
CONTENT_DECOY, CONSTANT_DECOY, GATHERER = (1, 0), (1, 1), (0, 0)
SCALE = 8.0

# Residual-stream dimensions.
DUMP, BOS, LF, UF, POS, FLAG, T, CONST = range(8)
ID = {c: 8 + i for i, c in enumerate(LETTERS)}  # the token is the task letter c
IDU = {c: 18 + i for i, c in enumerate(LETTERS)}  # the token is C
P = {c: 28 + i for i, c in enumerate(LETTERS)}  # the most recent task letter is c
A = {c: 38 + i for i, c in enumerate(LETTERS)}  # share of answers that are C (content decoy)
assert max(A.values()) < D_MODEL

FMT = PromptFormat()
N_CLEAN, N_CORRUPT = 16, 12


def read(dim: int) -> torch.Tensor:
    """A read-out vector for one dimension that sums to zero, so LayerNorm's centring does not change it."""
    v = torch.zeros(D_MODEL)
    v[dim], v[DUMP] = 1.0, -1.0
    return v


def _head(block, head: int, q_bias=(), k_cols=(), v_cols=()) -> None:
    """Set one head of a GPT-2 attention. ``q_bias``: (coordinate, value) pairs, a constant query. ``k_cols``:
    (coordinate, read-out vector, scale), the key coordinate reading the residual. ``v_cols``: (coordinate,
    read-out vector, scale, target), the value coordinate reading the residual, written by ``c_proj`` into
    residual dimension ``target``."""
    base = head * HEAD_DIM
    w, b = block.attn.c_attn.weight, block.attn.c_attn.bias  # Conv1D: x @ w + b, columns [q | k | v]
    for coord, value in q_bias:
        b[base + coord] = value
    for coord, vector, scale in k_cols:
        w[:, D_MODEL + base + coord] = scale * vector
    for coord, vector, scale, target in v_cols:
        w[:, 2 * D_MODEL + base + coord] = scale * vector
        block.attn.c_proj.weight[base + coord, target] = 1.0


def planted_model(head: bool = True, gate: bool = True) -> TaskModel:
    """The model of the module docstring; ``head=False`` zeroes the planted head's weights, ``gate=False``
    removes the pairing gate (the layer-0 MLP)."""
    hf = linear_gpt2(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS, n_inner=len(LETTERS), activation_function="relu")
    config = hf.config
    tok = char_tokenizer()
    tid = tok.convert_tokens_to_ids
    with torch.no_grad():
        t = hf.transformer  # LN(h) = centred h, see the docstring
        t.wte.weight[tid("<bos>"), BOS] = 1.0
        for c in LETTERS:
            t.wte.weight[tid(c), LF] = t.wte.weight[tid(c), ID[c]] = 1.0
            t.wte.weight[tid(c.upper()), UF] = t.wte.weight[tid(c.upper()), IDU[c]] = 1.0
        t.wpe.weight[:, POS] = 0.01 * torch.arange(config.n_positions, dtype=torch.float32)
        # Layer 0: the gatherer, then the pairing gate.
        _head(t.h[0], GATHERER[1], q_bias=[(0, 2000.0), (1, 1000.0)], k_cols=[(0, read(LF), 1.0), (1, read(POS), 1.0)],
              v_cols=[(i, read(ID[c]), 1.0, P[c]) for i, c in enumerate(LETTERS)])
        if gate:
            mlp = t.h[0].mlp
            for u, c in enumerate(LETTERS):
                mlp.c_fc.weight[:, u] = read(IDU[c]) + read(P[c])
                mlp.c_fc.bias[u] = -1.5
                mlp.c_proj.weight[u, FLAG] = 2.0
        # Layer 1: the content decoy, the planted head, the constant decoy.
        _head(t.h[1], CONTENT_DECOY[1], q_bias=[(0, 50.0)], k_cols=[(0, read(UF), 1.0)],
              v_cols=[(i, read(IDU[c]), 1.0, A[c]) for i, c in enumerate(LETTERS)])
        if head:
            _head(t.h[1], PLANTED[1], q_bias=[(0, 50.0)], k_cols=[(0, read(UF), 1.0)], v_cols=[(0, read(FLAG), 1.0, T)])
        _head(t.h[1], CONSTANT_DECOY[1], q_bias=[(0, 50.0)], k_cols=[(0, read(BOS), 1.0)],
              v_cols=[(0, read(BOS), 5.0, CONST)])
        lm = hf.lm_head.weight
        for c in LETTERS:
            lm[tid(c)] = SCALE * 1.5 * read(P[c])
            lm[tid(c.upper())] = SCALE * (read(P[c]) + read(T) + read(A[c]))
    assert hf.lm_head.weight.data_ptr() != t.wte.weight.data_ptr(), "the unembedding must not be tied"
    return wrap(hf, tok, name="planted-heads-gpt2", weights_sha256=f"planted-heads-gpt2-v1-{head}-{gate}")


def upper_task() -> Task:
    return Task("planted_heads_upper", "algorithmic", "task letter to uppercase (planted heads model)", "exact",
                tuple(Example(c, (c.upper(),)) for c in LETTERS))


CLEAN = sample_prompts(upper_task(), N_CLEAN, 5, 0, "heads-planted-clean", 0)
CORRUPT = [H.shuffled_labels(p, 0) for p in sample_prompts(upper_task(), N_CORRUPT, 5, 0, "heads-planted-corrupt", 0)]
QUERIES = [q.query_text(FMT) for q in sample_queries(upper_task(), len(LETTERS), 0, "heads-planted-queries")]


def answers(model: TaskModel, queries) -> list[int]:
    return [H.answer_token(model.tokenizer, FMT, q) for q in queries]


def study(model: TaskModel):
    """Clean means over the in-context prompts and the indirect effects on the shuffled ones."""
    means = H.mean_head_outputs(model, [p.regular_text(FMT) for p in CLEAN])
    corrupt = [p.regular_text(FMT) for p in CORRUPT]
    effect = H.indirect_effects(model, corrupt, answers(model, [p.query for p in CORRUPT]), means)
    return means, effect


def fv_accuracy(model: TaskModel, fvs, layer: int):
    """Share of the query-only prompts answered with the query's uppercase when a function vector is added
    to the last token's residual stream after ``layer``: one share per vector of ``fvs`` (a list), or a
    float for one (d_model,) vector. All vectors run in one call, each on every query."""
    many = isinstance(fvs, (list, tuple))
    fvs = list(fvs) if many else [fvs]
    texts = QUERIES * len(fvs)
    vectors = torch.zeros(len(texts), model.n_layers, model.d_model)
    vectors[:, layer] = torch.stack(fvs).repeat_interleave(len(QUERIES), dim=0)
    ids = mechanism.patched_next_tokens(model, texts, vectors, [layer], add=True)[0]
    n = len(QUERIES)
    shares = [_accuracy(model, ids[i * n:(i + 1) * n], QUERIES) for i in range(len(fvs))]
    return shares if many else shares[0]


def _accuracy(model: TaskModel, ids: torch.Tensor, texts) -> float:
    want = [model.tokenizer.convert_tokens_to_ids(text[-3].upper()) for text in texts]  # "...x->": x is 3rd last
    return sum(int(i) == w for i, w in zip(ids.tolist(), want)) / len(texts)


@pytest.fixture(scope="module")
def planted():
    return planted_model()


@pytest.fixture(scope="module")
def planted_study(planted):
    return study(planted)


def test_the_prompts_are_what_the_construction_needs():
    assert all(p.query.input not in {d.input for d in p.demonstrations} for p in CLEAN + CORRUPT)
    for p in CORRUPT:  # shuffled: no demonstration keeps its own answer, the answers as a multiset stay
        assert all(d.output != d.input.upper() for d in p.demonstrations)
        assert sorted(d.output for d in p.demonstrations) == sorted(d.input.upper() for d in p.demonstrations)
    assert sorted(q[-3] for q in QUERIES) == sorted(LETTERS)


def test_the_model_does_the_task_in_context_only_with_true_pairs(planted):
    regular = [p.regular_text(FMT) for p in CLEAN]
    assert _accuracy(planted, mechanism.next_tokens(planted, regular), regular) == 1.0
    shuffled = [p.regular_text(FMT) for p in CORRUPT]
    echo = [planted.tokenizer.convert_tokens_to_ids(text[-3]) for text in shuffled]
    assert mechanism.next_tokens(planted, shuffled).tolist() == echo  # a shuffled prompt: the query echoed
    alone = mechanism.next_tokens(planted, QUERIES)
    assert alone.tolist() == [planted.tokenizer.convert_tokens_to_ids(q[-3]) for q in QUERIES]  # as is the query alone


def test_the_planted_head_reads_pairs_and_the_decoy_content(planted):
    """On a prompt and its shuffled twin (same tokens), the content decoy's last-token output is the same and
    the planted head's goes from 1 to 0: only a pairing-sensitive head can have an indirect effect."""
    clean = [p.regular_text(FMT) for p in CLEAN]
    twins = [H.shuffled_labels(p, 0).regular_text(FMT) for p in CLEAN]
    good, bad = mechanism.head_outputs(planted, clean), mechanism.head_outputs(planted, twins)
    layer, head = PLANTED
    torch.testing.assert_close(good[layer][:, head, 0], torch.ones(len(clean)), atol=1e-4, rtol=0)
    torch.testing.assert_close(bad[layer][:, head, 0], torch.zeros(len(clean)), atol=1e-4, rtol=0)
    layer, head = CONTENT_DECOY
    torch.testing.assert_close(good[layer][:, head], bad[layer][:, head], atol=1e-5, rtol=0)


def test_indirect_effects_single_out_the_planted_head(planted, planted_study):
    means, effect = planted_study
    assert effect.shape == (N_CORRUPT, N_LAYERS, N_HEADS)
    mean = effect.mean(0)
    assert H.top_heads(mean, 1) == [PLANTED]
    others = [float(mean[layer, head]) for layer in range(N_LAYERS) for head in range(N_HEADS)
              if (layer, head) != PLANTED]
    assert float(mean[PLANTED]) > 0.9  # P(answer) from about 0.02 to about 0.97 (docstring)
    assert max(abs(x) for x in others) < 0.1  # a clear margin: no other head moves it by more than 0.1
    assert (effect[:, PLANTED[0], PLANTED[1]] > 0.9).all()  # on every corrupted prompt, not just on average
    # The means matter: the constant decoy's output is the largest of all heads, yet it does nothing.
    norms = torch.stack([m.norm(dim=-1) for m in means])
    assert divmod(int(norms.argmax()), N_HEADS) == CONSTANT_DECOY
    assert abs(float(mean[CONSTANT_DECOY])) < 1e-5


def test_the_planted_heads_function_vector_does_the_task_and_the_others_do_not(planted, planted_study):
    means, effect = planted_study
    layer = PLANTED[0]  # added after the planted head's own layer: where its write has landed
    assert fv_accuracy(planted, torch.zeros(D_MODEL), layer) == 0.0  # the query alone echoes
    fv = H.function_vector(planted, means, H.top_heads(effect.mean(0), 1))
    torch.testing.assert_close(fv, H.function_vector(planted, means, [PLANTED]))
    assert float(fv[T]) == pytest.approx(1.0, abs=1e-4)  # the planted head's write: T = 1
    assert fv_accuracy(planted, fv, layer) == 1.0
    others = [(lay, h) for lay in range(N_LAYERS) for h in range(N_HEADS) if (lay, h) != PLANTED]
    ranked = H.top_heads(effect.mean(0), N_LAYERS * N_HEADS)
    shares = fv_accuracy(planted, [H.function_vector(planted, means, [head]) for head in others]
                         # a sum with the planted head still works; the top non-planted heads alone do not
                         + [H.function_vector(planted, means, [PLANTED, CONTENT_DECOY, GATHERER]),
                            H.function_vector(planted, means, ranked[1:3])], layer)
    assert shares == [0.0] * len(others) + [1.0, 0.0]


@pytest.mark.parametrize("knockout", ["head zeroed", "no pairing gate"])
def test_without_the_planted_head_or_the_task_the_effect_is_gone(knockout):
    """The flip side: the same checks on a model without the planted head's weights, or without the pair
    feature it copies, find nothing (so the tests above can fail)."""
    model = planted_model(head=knockout != "head zeroed", gate=knockout != "no pairing gate")
    regular = [p.regular_text(FMT) for p in CLEAN]
    assert _accuracy(model, mechanism.next_tokens(model, regular), regular) == 0.0  # no in-context task
    means, effect = study(model)
    mean = effect.mean(0)
    assert abs(float(mean[PLANTED])) < 1e-4
    assert float(mean.max()) < 0.1  # no head carries the task
    fv = H.function_vector(model, means, [PLANTED])
    assert fv_accuracy(model, fv, PLANTED[0]) == 0.0
    assert fv_accuracy(model, H.function_vector(model, means, H.top_heads(mean, 1)), PLANTED[0]) == 0.0


def test_the_study_end_to_end_finds_the_planted_head_and_a_working_function_vector(planted):
    """:func:`H.task_heads` (its own prompts, the protocol's format) and :func:`H.fv_dev_sweep` agree: the
    model does the task in context, the planted head tops the ranking, and its function vector does the task
    after either layer (in this model layer 1 reads nothing of ``T``), so the earlier layer is chosen."""
    from taskvec.settings import Protocol

    protocol = Protocol()
    result = H.task_heads(planted, upper_task(), protocol, H.HeadSizes(n_mean=8, n_corrupt=6))
    assert all(result.regular)
    ranked = H.top_heads(result.effect.mean(0), N_LAYERS * N_HEADS)
    assert ranked[0] == PLANTED and float(result.effect.mean(0)[PLANTED]) > 0.9
    vectors = {1: H.function_vector(planted, result.means, ranked[:1]),
               2: H.function_vector(planted, result.means, ranked[1:3])}  # "2": the two heads after it, without it
    dev = H.fv_dev_sweep(planted, upper_task(), protocol, vectors, n_dev=len(LETTERS))
    accuracy = dev.groupby(["k", "layer"])["correct"].mean()
    assert accuracy.loc[1].tolist() == [1.0] * N_LAYERS
    assert accuracy.loc[2].tolist() == [0.0] * N_LAYERS
    assert H.choose_fv(dev) == (1, 0)
