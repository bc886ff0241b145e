"""The (A, f) mechanism through nnsight: read θ at every layer, patch θ at layer L.

``A``: run demonstrations + a dummy query and read the residual stream at the last
token after every decoder layer (one forward pass gives θ for all layers); average
over the dummy queries. ``f``: run the query alone and overwrite the last token's
residual stream after layer ``L`` with θ; read the next token. Every function works
on batches (left padded, with mask-derived position ids, so a batch gives the
answers of its prompts run one by one) and computes logits for the last position
only. Tensors come back on the CPU in float32.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Sequence

import nnsight
import torch

from . import remote
from .arch import residual
from .models import TaskModel


@dataclass
class Usage:
    """What the model was asked to do, for the benchmark: requests, traces, rows, real tokens, seconds.

    A request is one round trip: a session of one or more traces (on NDIF, one HTTP request).
    """

    by_phase: dict = field(default_factory=dict)

    @contextmanager
    def track(self, phase: str, encs: Sequence[dict]):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():  # kernels run asynchronously: wait before reading the clock
            torch.cuda.synchronize()
        entry = self.by_phase.setdefault(phase, {"requests": 0, "traces": 0, "rows": 0, "tokens": 0, "seconds": 0.0})
        entry["requests"] += 1
        entry["traces"] += len(encs)
        entry["rows"] += sum(int(enc["input_ids"].shape[0]) for enc in encs)
        entry["tokens"] += sum(int(enc["attention_mask"].sum()) for enc in encs)
        entry["seconds"] += time.perf_counter() - start

    def total(self, key: str) -> float:
        return sum(entry[key] for entry in self.by_phase.values())

    def reset(self) -> None:
        self.by_phase.clear()


USAGE = Usage()


def encode(model: TaskModel, texts: Sequence[str]) -> dict[str, torch.Tensor]:
    """Tokenize with left padding; ``position_ids`` count from each row's first real token."""
    if not texts:
        raise ValueError("no texts to encode")
    tok = model.tokenizer
    if tok.padding_side != "left":
        raise ValueError("the tokenizer must pad on the left (taskvec.models.wrap sets this)")
    enc = tok(list(texts), return_tensors="pt", padding=True)
    mask = enc["attention_mask"]
    return {
        "input_ids": enc["input_ids"],
        "attention_mask": mask,
        "position_ids": (mask.long().cumsum(-1) - 1).clamp(min=0),
    }


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


def _length_batches(model: TaskModel, texts: Sequence[str], size: int):
    """Index lists of at most ``size`` texts, grouped by token length to keep padding small."""
    lengths = [len(ids) for ids in model.tokenizer(list(texts)).input_ids]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    for rows in _batches(len(order), size):
        yield order[rows]


# --- intervention helpers, called inside an open trace ----------------------------

def last_token_residual(model: TaskModel, layer: int) -> torch.Tensor:
    """Inside a trace: the residual stream after ``layer`` at the last token, (batch, d_model)."""
    return residual(model.arch.layer_modules(model.nn)[layer].output)[:, -1, :]


def patch_last_token(model: TaskModel, layer: int, vectors: torch.Tensor, rows: slice = slice(None)) -> None:
    """Inside a trace: overwrite the last token's residual stream after ``layer`` for ``rows``.

    ``vectors`` is (len(rows), d_model) or (d_model,), already on the model's device.
    The write is in place on the tensor the next layer receives, so it propagates.
    """
    hidden = residual(model.arch.layer_modules(model.nn)[layer].output)
    hidden[rows, -1, :] = vectors


def next_token_logits(model: TaskModel) -> torch.Tensor:
    """Inside a trace: the unembedding's output at the last position, (batch, vocab)."""
    return model.arch.get(model.nn, model.arch.unembed).output[:, -1, :]


#: Largest result one request should bring back: NDIF returns results up to 8 MiB inline over its
#: websocket, larger ones through its object store (slower), so a phase is split to stay below.
INLINE_BYTES = 7 * 2**20
#: Largest request one session should send: NDIF's API refuses a request body over 1 MiB ("There was
#: an error parsing the body"; measured on ndif 0.1.2: 0.9 MiB passes, 1.1 MiB fails). Inputs and the
#: θ vectors patched in travel with the request, so remote batches and sessions stay below this.
REQUEST_BYTES = 640 * 2**10


def _sent_bytes(enc: dict, extra: int = 0) -> int:
    return sum(int(t.numel() * t.element_size()) for t in enc.values()) + extra


def _requests(model: TaskModel, phase: str, encs: Sequence[dict], step, row_bytes: int,
              sent: Sequence[int] | None = None, args: Sequence | None = None) -> list:
    """Run one trace per batch in ``encs``; ``step(args[i])`` is called inside batch ``i``'s open trace
    and returns the value to bring back (``args`` default: None per batch). A request carries only its
    own batches' inputs and args. Batches are bundled into sessions (one request each, on NDIF one
    round trip) whose results stay under :data:`INLINE_BYTES` (``row_bytes`` per row) and, remotely,
    whose requests stay under :data:`REQUEST_BYTES` (``sent[i]`` bytes for batch ``i``, default its
    inputs). Remote requests are retried and their failures name the host, model, task and phase
    (:func:`taskvec.remote.call`).
    """
    far = remote.is_remote(model.remote)
    sent = list(sent) if sent is not None else [_sent_bytes(enc) for enc in encs]
    groups, group, size, load = [], [], 0, 0
    for i, enc in enumerate(encs):
        rows = int(enc["input_ids"].shape[0]) * row_bytes
        if group and (size + rows > INLINE_BYTES or (far and load + sent[i] > REQUEST_BYTES)):
            groups.append(group)
            group, size, load = [], 0, 0
        group.append(i)
        size, load = size + rows, load + sent[i]
    groups.append(group)
    if far:
        remote.ship_code()
    out: list = [None] * len(encs)
    # logits_to_keep=1: the unembedding runs on the last position only (262k-wide for Gemma 3).
    args = list(args) if args is not None else [None] * len(encs)
    for group in groups:
        # Only this request's batches: the body is serialized with everything it refers to.
        # Remotely the session is submitted when it exits and collected by remote.wait (bounded).
        def body(batches=[(dict(encs[i]), args[i]) for i in group]):
            job = remote.backend(model.nn, model.remote)
            with model.nn.session(backend=job, remote=model.remote):
                values = nnsight.save([])
                for enc, arg in batches:
                    with model.nn.trace(enc, logits_to_keep=1):
                        values.append(step(arg))
            return remote.wait(job)["values"] if job is not None else values

        with USAGE.track(phase, [encs[i] for i in group]), remote.where(phase=phase):
            values = remote.call(body, model.remote, model.name)
        for i, value in zip(group, values):
            out[i] = value.cpu()
    return out


# --- batched operations ---------------------------------------------------------

def _value_bytes(model: TaskModel, return_logits: bool) -> int:
    """Bytes one row brings back: a token id, or a row of float32 logits."""
    return 4 * int(model.hf.config.vocab_size) if return_logits else 8


@torch.no_grad()
def next_tokens(model: TaskModel, texts: Sequence[str], batch_size: int = 64, phase: str = "predict",
                return_logits: bool = False) -> torch.Tensor:
    """Greedy next-token id for each text, (n,) long; Regular and Baseline use this.

    With ``return_logits`` the last-position logits instead, (n, vocab) float32 on CPU.
    """
    index = list(_length_batches(model, texts, batch_size))
    encs = [encode(model, [texts[i] for i in rows]) for rows in index]

    def step(_):
        logits = next_token_logits(model)
        return logits.float() if return_logits else logits.argmax(-1)

    values = _requests(model, phase, encs, step, _value_bytes(model, return_logits))
    out = torch.empty((len(texts), *values[0].shape[1:]), dtype=values[0].dtype)
    for rows, value in zip(index, values):
        out[rows] = value
    return out


@torch.no_grad()
def hidden_states(model: TaskModel, texts: Sequence[str], batch_size: int = 64, phase: str = "extract") -> torch.Tensor:
    """Last-token residual stream after every layer, (n, n_layers, d_model), float32 on CPU.

    One forward pass per batch serves all layers.
    """
    n_layers = model.n_layers
    index = list(_length_batches(model, texts, batch_size))
    encs = [encode(model, [texts[i] for i in rows]) for rows in index]

    def step(_):
        return torch.stack([last_token_residual(model, layer) for layer in range(n_layers)], dim=1)

    values = _requests(model, phase, encs, step, 4 * n_layers * model.d_model)
    out = torch.empty(len(texts), n_layers, model.d_model)
    for rows, value in zip(index, values):
        out[rows] = value.detach().float()
    return out


def task_vectors(model: TaskModel, dummy_texts: Sequence[Sequence[str]], batch_size: int = 64,
                 phase: str = "extract") -> torch.Tensor:
    """θ for every prompt and layer, (n_prompts, n_layers, d_model): the mean over each prompt's dummy queries."""
    counts = {len(texts) for texts in dummy_texts}
    if len(counts) != 1 or 0 in counts:
        raise ValueError("every prompt needs the same, non-zero number of dummy queries")
    (k,) = counts
    flat = [text for texts in dummy_texts for text in texts]
    states = hidden_states(model, flat, batch_size, phase=phase)
    return states.view(len(dummy_texts), k, *states.shape[1:]).mean(dim=1)


def _placed(model: TaskModel, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` ready to write into the model: on its device in its dtype; remote, float32 on the CPU
    (it travels with the request, and the server casts it into its own dtype on write)."""
    if remote.is_remote(model.remote):
        return tensor.float().cpu()
    weight = next(model.hf.parameters())
    return tensor.to(device=weight.device, dtype=weight.dtype)


@torch.no_grad()
def patched_next_tokens(model: TaskModel, texts: Sequence[str], vectors: torch.Tensor, layers: Sequence[int],
                        batch_size: int = 256, phase: str = "patch", return_logits: bool = False) -> torch.Tensor:
    """Next token of each text with θ patched at the last token after each of ``layers``.

    ``vectors``: (n_texts, n_layers, d_model), θ of every layer for each text (row i
    patches text i). Returns (len(layers), n_texts) token ids. Layers are batched
    together: each text appears once per layer in one forward pass, so a sweep over
    all layers costs ceil(n_texts * len(layers) / batch_size) traces. With
    ``return_logits``: (len(layers), n_texts, vocab) float32 logits instead of ids.
    """
    n = len(texts)
    if vectors.dim() != 3 or vectors.shape[0] != n:
        raise ValueError(f"vectors must be (n_texts={n}, n_layers, d_model), got {tuple(vectors.shape)}")
    layers = list(layers)
    bad = [layer for layer in layers if not 0 <= layer < model.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range for a model with {model.n_layers} layers")
    if len(set(layers)) != len(layers):
        raise ValueError(f"layers must not repeat, got {layers}")
    if remote.is_remote(model.remote):  # the θ rows of a batch travel with the request
        batch_size = max(1, min(batch_size, REQUEST_BYTES // 2 // (4 * model.d_model)))
    # One row per (layer, text); rows are grouped by layer so each layer patches a contiguous block.
    jobs = [(li, i) for li in range(len(layers)) for i in range(n)]
    chunks = [jobs[rows] for rows in _batches(len(jobs), batch_size)]
    encs, plans = [], []
    for chunk in chunks:
        encs.append(encode(model, [texts[i] for _, i in chunk]))
        blocks: dict[int, list[tuple[int, int]]] = {}
        for row, (li, i) in enumerate(chunk):
            blocks.setdefault(layers[li], []).append((row, i))
        # Sorted so layers are visited in execution order, as nnsight requires.
        plans.append([(layer, slice(members[0][0], members[-1][0] + 1),
                       _placed(model, vectors[[i for _, i in members], layer]))
                      for layer, members in sorted(blocks.items())])

    def step(plan):
        for layer, block, theta in plan:
            patch_last_token(model, layer, theta, block)
        logits = next_token_logits(model)
        return logits.float() if return_logits else logits.argmax(-1)

    sent = [_sent_bytes(enc, sum(int(theta.numel() * 4) for _, _, theta in plan)) for enc, plan in zip(encs, plans)]
    values = _requests(model, phase, encs, step, _value_bytes(model, return_logits), sent, plans)
    result = torch.empty((len(layers), n, *values[0].shape[1:]), dtype=values[0].dtype)
    for chunk, value in zip(chunks, values):
        for row, (li, i) in enumerate(chunk):
            result[li, i] = value[row]
    return result


@torch.no_grad()
def vocab_logits(model: TaskModel, vectors: torch.Tensor) -> torch.Tensor:
    """Residual-stream vectors read through the final norm and the unembedding, (n, vocab) float32 on CPU.

    The model's own read-out, applied inside a trace (on a one-token input), so it runs wherever
    the model does, NDIF included. ``vectors``: (n, d_model).
    """
    if vectors.dim() != 2 or vectors.shape[1] != model.d_model:
        raise ValueError(f"vectors must be (n, d_model={model.d_model}), got {tuple(vectors.shape)}")
    theta = _placed(model, vectors)
    encs = [encode(model, [model.tokenizer.decode([model.tokenizer.pad_token_id])])]
    norm = model.arch.get(model.nn, model.arch.final_norm)
    unembed = model.arch.get(model.nn, model.arch.unembed)

    def step(vectors):
        return unembed(norm(vectors[:, None, :]))[:, -1].float()

    return _requests(model, "vocab", encs, step, _value_bytes(model, True) * len(theta),
                     [_sent_bytes(encs[0], int(theta.numel() * 4))], [theta])[0]
