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
    """What the model was asked to do, for the benchmark: traces, rows, real tokens, seconds."""

    by_phase: dict = field(default_factory=dict)

    @contextmanager
    def track(self, phase: str, enc: dict):
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():  # kernels run asynchronously: wait before reading the clock
            torch.cuda.synchronize()
        entry = self.by_phase.setdefault(phase, {"traces": 0, "rows": 0, "tokens": 0, "seconds": 0.0})
        entry["traces"] += 1
        entry["rows"] += int(enc["input_ids"].shape[0])
        entry["tokens"] += int(enc["attention_mask"].sum())
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


def _trace(model: TaskModel, enc: dict):
    # logits_to_keep=1: the unembedding runs on the last position only (262k-wide for Gemma 3).
    if remote.is_remote(model.remote):
        remote.ship_code()
    return model.nn.trace(dict(enc), remote=model.remote, logits_to_keep=1)


def _request(model: TaskModel, phase: str, enc: dict, body):
    """Run one trace (``body()``), counted in USAGE; remote requests are retried and their failures
    name the host, model, task and phase (see :func:`taskvec.remote.call`)."""
    with USAGE.track(phase, enc), remote.where(phase=phase):
        return remote.call(body, model.remote, model.name)


# --- batched operations ---------------------------------------------------------

@torch.no_grad()
def next_tokens(model: TaskModel, texts: Sequence[str], batch_size: int = 64, phase: str = "predict",
                return_logits: bool = False) -> torch.Tensor:
    """Greedy next-token id for each text, (n,) long; Regular and Baseline use this.

    With ``return_logits`` the last-position logits instead, (n, vocab) float32 on CPU.
    """
    out = None
    for index in _length_batches(model, texts, batch_size):
        enc = encode(model, [texts[i] for i in index])

        def body(enc=enc):
            with _trace(model, enc):
                logits = next_token_logits(model)
                value = nnsight.save(logits.float() if return_logits else logits.argmax(-1))
            return value

        value = _request(model, phase, enc, body)
        if out is None:
            out = torch.empty((len(texts), *value.shape[1:]), dtype=value.dtype)
        out[index] = value.cpu()
    return out


@torch.no_grad()
def hidden_states(model: TaskModel, texts: Sequence[str], batch_size: int = 64, phase: str = "extract") -> torch.Tensor:
    """Last-token residual stream after every layer, (n, n_layers, d_model), float32 on CPU.

    One forward pass per batch serves all layers.
    """
    n_layers = model.n_layers
    out = torch.empty(len(texts), n_layers, model.d_model)
    for index in _length_batches(model, texts, batch_size):
        enc = encode(model, [texts[i] for i in index])

        def body(enc=enc):
            with _trace(model, enc):
                per_layer = [last_token_residual(model, layer) for layer in range(n_layers)]
                stacked = nnsight.save(torch.stack(per_layer, dim=1))
            return stacked

        out[index] = _request(model, phase, enc, body).detach().float().cpu()
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
    # Remote: θ travels with the request from the CPU (the server casts it into its own dtype on write).
    device, dtype = ("cpu", torch.float32) if remote.is_remote(model.remote) else (model.device, next(model.hf.parameters()).dtype)
    # One row per (layer, text); rows are grouped by layer so each layer patches a contiguous block.
    jobs = [(li, i) for li in range(len(layers)) for i in range(n)]
    result = None
    for rows in _batches(len(jobs), batch_size):
        chunk = jobs[rows]
        enc = encode(model, [texts[i] for _, i in chunk])
        blocks: dict[int, list[tuple[int, int]]] = {}
        for row, (li, i) in enumerate(chunk):
            blocks.setdefault(layers[li], []).append((row, i))
        # Sorted so layers are visited in execution order, as nnsight requires.
        plan = [
            (layer, slice(members[0][0], members[-1][0] + 1),
             vectors[[i for _, i in members], layer].to(device=device, dtype=dtype))
            for layer, members in sorted(blocks.items())
        ]

        def body(enc=enc, plan=plan):
            with _trace(model, enc):
                for layer, block, theta in plan:
                    patch_last_token(model, layer, theta, block)
                logits = next_token_logits(model)
                value = nnsight.save(logits.float() if return_logits else logits.argmax(-1))
            return value

        value = _request(model, phase, enc, body)
        if result is None:
            result = torch.empty((len(layers), n, *value.shape[1:]), dtype=value.dtype)
        value = value.cpu()
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
    if remote.is_remote(model.remote):
        theta = vectors.float().cpu()
    else:
        weight = next(model.hf.parameters())
        theta = vectors.to(device=weight.device, dtype=weight.dtype)
    enc = encode(model, [model.tokenizer.decode([model.tokenizer.pad_token_id])])
    norm = model.arch.get(model.nn, model.arch.final_norm)
    unembed = model.arch.get(model.nn, model.arch.unembed)

    def body():
        with _trace(model, enc):
            logits = nnsight.save(unembed(norm(theta[:, None, :]))[:, -1].float())
        return logits

    return _request(model, "vocab", enc, body).cpu()
