"""A tiny GPT-2 with hand-set weights whose task-vector results are known by construction.

Random tiny models score 0.0 everywhere and give flat dev curves, so a test on them
cannot tell a right method from a wrong one. This model does a to-upper task
(``b -> B``) only as far as in-context learning tells it to, through a mechanism
placed at known layers, so the Hypothesis accuracy of a patch at each layer, the
best layer, and the Regular and Baseline accuracies can be worked out by hand.

The task letters come in three groups (none of them occurs in ``example``)::

    G0 = b c d f   known to the model: upper-cased even with no demonstrations
    G1 = g h i j   upper-cased once task signal 1 is in the residual stream
    G2 = k n o q   upper-cased once task signal 2 is in the residual stream

Four layers, each one attention head; every MLP is zero (it adds nothing):

- layer 0 does nothing;
- layer 1 writes task signal 1 (``T1 = 1``) into a ``>`` token whose context holds a
  newline, i.e. a prompt with demonstrations; with no newline it writes 0;
- layer 2 writes task signal 2 (``T2 = 1``) the same way;
- layer 3 copies the identity of the most recent lowercase letter into the last
  token (``Q_x = 1``): the query letter ``x`` of ``example:x->``.

Read-out (the logits of the last token, exactly linear, see "LayerNorm" below), with
``GT = 1`` the marker every ``>`` residual carries:

- lowercase ``c``:          ``Q_c``
- uppercase ``C``, c in G0: ``Q_c + 0.5 GT``
- uppercase ``C``, c in G1: ``Q_c + T1 - 0.5 GT``
- uppercase ``C``, c in G2: ``Q_c + T2 - 0.5 GT``
- ``?``:                    ``0.25`` (a bias of the final norm: see below)
- every other token:        ``0``

So with the query read (``Q_x = 1``) the answer is ``X`` when ``x`` is in G0, or in
G1 with ``T1 = 1``, or in G2 with ``T2 = 1`` (logit 1.5 against 1 for ``x``); otherwise
it is the lowercase ``x`` (1 against 0.5): wrong.

**Regular** (demonstrations + query): T1 = T2 = 1 and Q_x = 1: always right, 1.0.
**Baseline** (query alone): no newline, T1 = T2 = 0: right exactly for G0 queries.
**Hypothesis at layer L**: θ is the last-token residual after layer L of
``demonstrations + dummy``, averaged over the 2 dummies; the query-only prompt then
runs layers L+1..3 on it:

- L = 0: θ holds no signal; layers 1, 2 see no newline in the query prompt and add
  nothing; layer 3 reads x. As Baseline: right for G0.
- L = 1: θ holds T1; layer 2 adds nothing; layer 3 reads x. Right for G0 and G1.
- L = 2: θ holds T1 and T2; layer 3 reads x. Right for all.
- L = 3: θ was read after layer 3 of the dummy prompts: it holds each dummy letter at
  weight 0.5 and no trace of the real query, and no layer is left to read it. The
  answer is a dummy's uppercase (logit 1.0 against at most 0.5 for anything else),
  never the query's (dummies differ from the query): always wrong.

Per query group and patch layer (1 = right)::

             L=0  L=1  L=2  L=3   Baseline  Regular
       G0     1    1    1    0       1         1
       G1     0    1    1    0       0         1
       G2     0    0    1    0       0         1

A dev curve is therefore [n0, n0 + n1, n, 0] / n for a dev set of n0 G0, n1 G1 and
n2 G2 queries: a dev set without G2 queries ties layers 1 and 2 (earliest argmax 1,
latest 2, argmin 3), and a test set with G2 queries would pick layer 2 if L were chosen
on it. :func:`planted_prompts` builds such sets; the numbers are in its docstring.

How the weights do it (d_model 33, one dimension per feature):

- Embeddings: ``<bos>`` -> BOS, ``\\n`` -> NL, ``>`` -> GT, any lowercase letter -> LF,
  task letter c -> also ID_c; everything else 0. Position p -> POS = 0.01 p.
- LayerNorm: ``layer_norm_epsilon`` = 1e6 and weight 1000, so LN(h) = (h - mean(h)) *
  (1 + var(h)/1e6)^-1/2, i.e. the centring map up to a relative 1e-6 (every residual
  here has var < 1). Every read-out vector sums to zero (``e_i - e_DUMP``, where DUMP is a
  dimension nothing writes), so reading centred h is reading h: the model is linear
  apart from the attention softmax and the final argmax. The final norm alone also has a
  bias, 0.25 on a dimension BIAS that only the ``?`` row reads: below every answer's logit
  (>= 1), so it changes no prediction, but a read-out that skipped the final norm would miss it.
- Writer heads (layers 1, 2): score = 50 BOS_key + 100 GT_query NL_key. A ``>`` attends
  to the newlines if there are any (100 > 50), else to ``<bos>``; any other token attends
  to ``<bos>``. The value is NL_key into T1 (T2): the weights on newlines sum to 1, so a
  prompt with demonstrations gets exactly 1, a query-only prompt exactly 0.
- Reader head (layer 3): score = 2000 LF_key + 1000 POS_key (= 2000 LF + 10 p): the
  most recent lowercase letter wins, by 20 over the ``e`` of ``example`` two tokens
  before the query letter (weight e^-20); non-letters, the patched last token
  included, score at most 10 * 127 < 2000. The value is ID_c into Q_c.
- Attention is unscaled (``scale_attn_weights=False``); the unembedding is untied.
"""

from __future__ import annotations

import string

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from taskvec.experiment import PromptSet
from taskvec.models import TaskModel, wrap
from taskvec.prompts import FewShotPrompt
from taskvec.tasks import Example, Task

from conftest import SMALL, char_tokenizer

GROUPS = ("bcdf", "ghij", "knoq")
LETTERS = "".join(GROUPS)
N_LAYERS = 4
#: CORRECT[group][layer]: is a Hypothesis patch at ``layer`` right for a query of ``group``.
CORRECT = ((1, 1, 1, 0), (0, 1, 1, 0), (0, 0, 1, 0))
#: Baseline (query alone) is right for G0 queries only; Regular is always right.
BASELINE_CORRECT = (1, 0, 0)

# Residual-stream dimensions.
DUMP, BOS, NL, GT, LF, POS, T1, T2, BIAS = range(9)
ID = {c: 9 + i for i, c in enumerate(LETTERS)}
Q = {c: 9 + len(LETTERS) + i for i, c in enumerate(LETTERS)}
D_MODEL = 9 + 2 * len(LETTERS)
FINAL_BIAS = 0.25  # the logit of '?' through the final norm
POS_STEP = 0.01
EPS = 1e6


def group(letter: str) -> int:
    return next(g for g, members in enumerate(GROUPS) if letter in members)


def read(dim: int) -> torch.Tensor:
    """A read-out vector for one dimension that sums to zero, so it ignores LayerNorm's centring."""
    v = torch.zeros(D_MODEL)
    v[dim], v[DUMP] = 1.0, -1.0
    return v


def planted_task() -> Task:
    return Task("planted_upper", "algorithmic", "lowercase letter to uppercase (planted model)", "exact",
                tuple(Example(c, (c.upper(),)) for c in LETTERS))


def _attention(block, q_bias=None, q_cols=(), k_cols=(), v_cols=()) -> None:
    """Set one single-head attention layer: columns are (head coordinate, read-out vector, scale)."""
    d = D_MODEL
    weight = torch.zeros(d, 3 * d)  # Conv1D: x @ weight + bias, columns [q | k | v]
    bias = torch.zeros(3 * d)
    if q_bias is not None:
        bias[:d] = q_bias
    for offset, cols in ((0, q_cols), (d, k_cols), (2 * d, v_cols)):
        for coord, vector, scale in cols:
            weight[:, offset + coord] = scale * vector
    block.attn.c_attn.weight.copy_(weight)
    block.attn.c_attn.bias.copy_(bias)
    block.attn.c_proj.weight.copy_(torch.eye(d))  # the value's coordinates are residual dimensions


def linear_gpt2(**sizes) -> GPT2LMHeadModel:
    """A GPT-2 of ``sizes`` (n_embd, n_layer, n_head, n_inner, ...) for hand-set weights: every weight zero,
    no dropout, unscaled attention, untied unembedding, and every LayerNorm linear (epsilon EPS, weight
    sqrt(EPS): LN(h) = centred h up to a relative 1e-6 for the small residuals planted models have)."""
    config = GPT2Config(n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, layer_norm_epsilon=EPS,
                        scale_attn_weights=False, tie_word_embeddings=False, **{**SMALL, **sizes})
    hf = GPT2LMHeadModel(config).to(torch.float32)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()
        t = hf.transformer
        for norm in [t.ln_f] + [m for b in t.h for m in (b.ln_1, b.ln_2)]:
            norm.weight.fill_(EPS ** 0.5)
    return hf


def planted_model() -> TaskModel:
    hf = linear_gpt2(n_embd=D_MODEL, n_layer=N_LAYERS, n_head=1, n_inner=4)
    config = hf.config
    tok = char_tokenizer()
    tid = tok.convert_tokens_to_ids
    with torch.no_grad():
        t = hf.transformer
        t.ln_f.bias[BIAS] = FINAL_BIAS
        wte = t.wte.weight
        wte[tid("<bos>"), BOS] = 1.0
        wte[tid("\n"), NL] = 1.0
        wte[tid(">"), GT] = 1.0
        for c in string.ascii_lowercase:
            wte[tid(c), LF] = 1.0
        for c in LETTERS:
            wte[tid(c), ID[c]] = 1.0
        t.wpe.weight[:, POS] = POS_STEP * torch.arange(config.n_positions, dtype=torch.float32)
        # Layers 1 and 2: a '>' attends to the newlines (demonstrations) and writes their share into T1 / T2.
        q_bias = torch.zeros(D_MODEL)
        q_bias[0] = 50.0
        for layer, target in ((1, T1), (2, T2)):
            _attention(t.h[layer], q_bias, q_cols=[(1, read(GT), 100.0)],
                       k_cols=[(0, read(BOS), 1.0), (1, read(NL), 1.0)], v_cols=[(target, read(NL), 1.0)])
        # Layer 3: attend to the most recent lowercase letter and copy its identity into Q.
        q_bias = torch.zeros(D_MODEL)
        q_bias[0], q_bias[1] = 2000.0, 1000.0
        _attention(t.h[3], q_bias, k_cols=[(0, read(LF), 1.0), (1, read(POS), 1.0)],
                   v_cols=[(Q[c], read(ID[c]), 1.0) for c in LETTERS])
        head = hf.lm_head.weight
        head[tid("?")] = read(BIAS)
        for c in LETTERS:
            head[tid(c)] = read(Q[c])
            upper = read(Q[c]) + (0.5 * read(GT) if group(c) == 0 else read(T1 if group(c) == 1 else T2) - 0.5 * read(GT))
            head[tid(c.upper())] = upper
    assert hf.lm_head.weight.data_ptr() != t.wte.weight.data_ptr(), "the unembedding must not be tied"
    return wrap(hf, tok, name="planted-gpt2", weights_sha256="planted-gpt2-v1")


def prompt(line: str) -> FewShotPrompt:
    """``"bcdfg|h|ij"``: demonstrations b c d f g, query h, dummies i j (each letter -> its uppercase)."""
    demos, query, dummies = line.split("|")
    ex = lambda c: Example(c, (c.upper(),))  # noqa: E731
    return FewShotPrompt("planted_upper", tuple(map(ex, demos)), ex(query), tuple(map(ex, dummies)))


def planted_prompts() -> PromptSet:
    """Explicit prompt sets with known group make-up (queries: dev G0 G1 G1 G1; test G0 G1 G1 G2).

    - dev curve = [1/4, 4/4, 4/4, 0] (layer 0: the G0 query; 1 and 2: all; 3: none): earliest
      argmax 1, latest argmax 2, argmin 3.
    - on test, layer 1 is right for G0 and G1 queries: Hypothesis 3/4 = 0.75; the test prompts'
      own best layer would be 2 (1.0).
    - Regular 1.0; Baseline: 2 of its 5 queries are G0: 0.4 (Baseline on the test queries: 0.25).
    """
    dev = ["ghijk|b|no", "bcdkn|g|oq", "bcdkn|h|oq", "bcdfk|i|no"]
    test = ["ghijk|c|no", "bcdkn|j|oq", "bcdfk|g|no", "bcdfg|k|hi"]
    baseline = ["|d|", "|h|", "|f|", "|n|", "|q|"]
    return PromptSet(dev=[prompt(p) for p in dev], test=[prompt(p) for p in test],
                     baseline=[prompt(p) for p in baseline])
