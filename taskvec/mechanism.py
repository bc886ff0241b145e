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

import copy
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
    def track(self, phase: str, traces: int, rows: int, tokens: int, heads: int = 0):
        """Count one request of ``phase``: its traces, the rows they run, the tokens computed (new
        tokens only: a step on a key/value cache does not recompute the cached ones) and the rows
        read out through the unembedding (``heads``)."""
        start = time.perf_counter()
        yield
        if torch.cuda.is_available():  # kernels run asynchronously: wait before reading the clock
            torch.cuda.synchronize()
        entry = self.by_phase.setdefault(phase, {"requests": 0, "traces": 0, "rows": 0, "tokens": 0, "heads": 0,
                                                 "seconds": 0.0})
        entry["requests"] += 1
        entry["traces"] += traces
        entry["rows"] += rows
        entry["tokens"] += tokens
        entry["heads"] += heads
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


def _sent_bytes(*tensors: torch.Tensor, extra: int = 0) -> int:
    """Bytes a request carries for these tensors (dicts of tensors count all their values)."""
    total = extra
    for item in tensors:
        for t in (item.values() if isinstance(item, dict) else [item]):
            total += int(t.numel() * t.element_size())
    return total


@dataclass
class _Unit:
    """One piece of a phase: what its session function receives, and what it costs."""

    payload: tuple
    result_bytes: int  # what it brings back
    sent_bytes: int  # what it sends (inputs, θ)
    traces: int
    rows: int
    tokens: int  # tokens computed (cached ones are not recomputed)
    heads: int  # rows read out through the unembedding


def _requests(model: TaskModel, phase: str, units: Sequence[_Unit], session) -> list:
    """Run ``units`` bundled into requests, ``session(model, payloads)`` each; one value per unit, in order.

    A request (one nnsight session; on NDIF one round trip) carries only its own units, and is
    closed when its results would pass :data:`INLINE_BYTES` or, remotely, what it sends would pass
    :data:`REQUEST_BYTES`. Remote requests are retried and their failures name the host, model,
    task and phase (:func:`taskvec.remote.call`).
    """
    far = remote.is_remote(model.remote)
    groups, group, size, load = [], [], 0, 0
    for i, unit in enumerate(units):
        if group and (size + unit.result_bytes > INLINE_BYTES or (far and load + unit.sent_bytes > REQUEST_BYTES)):
            groups.append(group)
            group, size, load = [], 0, 0
        group.append(i)
        size, load = size + unit.result_bytes, load + unit.sent_bytes
    groups.append(group)
    if far:
        remote.ship_code()
    out: list = []
    for group in groups:
        members = [units[i] for i in group]
        payloads = [u.payload for u in members]
        counts = [sum(getattr(u, key) for u in members) for key in ("traces", "rows", "tokens", "heads")]
        with USAGE.track(phase, *counts), remote.where(phase=phase):
            values = remote.call(lambda: session(model, payloads), model.remote, model.name)
        out.extend(values)
    return out


#: ``logits_to_keep`` for a pass that only fills a key/value cache: no position reaches the unembedding
#: (262,144 wide for Gemma 3, as costly per row as the rest of the model).
NO_LOGITS = torch.tensor([], dtype=torch.long)


# --- sessions: each runs its payloads' traces in one nnsight session (remotely: one request) ---------
# The session is submitted when it exits and collected by remote.wait (bounded) when remote.
# nnsight reads a trace's body from its source: trace headers stay on one line, and no comment
# line opens a with-block.

def _plain_session(model: TaskModel, payloads: Sequence[tuple]) -> list:
    """Payloads ``(inputs, step, arg)``: one trace each, ``step(arg)`` called inside it."""
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for inputs, step, arg in payloads:
            with model.nn.trace(inputs, logits_to_keep=1):
                values.append(step(arg))
    return remote.wait(job)["values"] if job is not None else values


def _patched_session(model: TaskModel, payloads: Sequence[tuple]) -> list:
    """Payloads ``(prefix, step, rows, plan, want_logits)``: the prefix trace fills a key/value cache;
    the one-token step runs on ``rows`` of it with θ written after each ``plan`` layer."""
    unembed = model.arch.get(model.nn, model.arch.unembed)
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for prefix, step, rows, plan, want_logits in payloads:
            with model.nn.trace(prefix, use_cache=True, logits_to_keep=NO_LOGITS):
                cache = model.nn.output.past_key_values
            with model.nn.trace(step, past_key_values=select_rows(cache, rows), use_cache=True, logits_to_keep=1):
                for layer, block, theta in plan:
                    patch_last_token(model, layer, theta, block)
                logits = unembed.output[:, -1, :]
                values.append(logits.float() if want_logits else logits.argmax(-1))
    return remote.wait(job)["values"] if job is not None else values


def _prefix_session(model: TaskModel, payloads: Sequence[tuple]) -> list:
    """Payloads ``(prefix, step, rows, last)``: the shared prefixes fill a key/value cache; each text's
    own tokens run on its row of it. Returns (states after every layer at each text's last token,
    next-token id) per payload."""
    layer_modules = model.arch.layer_modules(model.nn)
    unembed = model.arch.get(model.nn, model.arch.unembed)
    top = model.n_layers - 1
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for prefix, step, rows, last in payloads:
            at = torch.arange(len(last))
            with model.nn.trace(prefix, use_cache=True, logits_to_keep=NO_LOGITS):
                cache = model.nn.output.past_key_values
            with model.nn.trace(step, past_key_values=select_rows(cache, rows), use_cache=True, logits_to_keep=1):
                reads = []
                for layer in range(top + 1):
                    hidden = residual(layer_modules[layer].output)
                    reads.append(hidden[at, last])
                    if layer == top:
                        hidden[at, -1] = hidden[at, last]
                values.append((torch.stack(reads, dim=1).float(), unembed.output[:, -1, :].argmax(-1)))
    return remote.wait(job)["values"] if job is not None else values


def _generate_session(model: TaskModel, payloads: Sequence[tuple]) -> list:
    """Payloads ``(inputs, layer, theta, max_new_tokens, stop_ids)``: one greedy ``generate`` trace each.

    With ``theta`` (rows, d_model), the residual stream after ``layer`` at each row's last prompt token
    is overwritten in the first forward only (the prompt's); the patched position then stays in the
    key/value cache for every later token. Returns the generated ids, (rows, <= max_new_tokens).
    """
    layer_modules = model.arch.layer_modules(model.nn)
    pad = model.tokenizer.pad_token_id
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for inputs, layer, theta, max_new_tokens, stop_ids in payloads:
            width = inputs["input_ids"].shape[1]
            with model.nn.generate(inputs, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids, pad_token_id=pad) as tracer:
                if theta is not None:
                    for step in tracer.iter[0]:
                        residual(layer_modules[layer].output)[:, -1, :] = theta
                values.append(tracer.result[:, width:])
    return remote.wait(job)["values"] if job is not None else values


# --- key/value caches -------------------------------------------------------------------------

def select_rows(cache, rows: torch.Tensor):
    """A copy of a transformers key/value ``cache`` holding batch rows ``rows`` (repeats allowed).

    Each layer object is copied shallowly (its sliding-window state and length stay as they are)
    and its keys and values re-indexed, so ``cache`` itself is left intact. A cache rebuilt from
    saved key/value tensors would not be the same: a sliding-window layer keeps only its window
    of keys, and its count of tokens seen sets the mask offsets.
    """
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    if new.layers:
        new.batch_select_indices(rows.to(cache.layers[0].keys.device))
    return new


def _left_padded(ids: Sequence[Sequence[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Left padded ``input_ids``/``attention_mask`` with mask-derived ``position_ids`` (as :func:`encode`)."""
    width = max(len(row) for row in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, width - len(row):] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row):] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def _continuation(prefix_mask: torch.Tensor, ids: Sequence[Sequence[int]], pad_id: int) -> tuple[dict, torch.Tensor]:
    """Inputs that continue cached row ``r`` (``prefix_mask[r]``) with ``ids[r]`` (at least one token).

    Right padded, so each row's tokens follow its prefix without a gap (Gemma 3's sliding-window
    layers count distance in positions of the cache, pads included); the attention mask covers the
    cache and the new tokens; positions continue from each row's real prefix length (pads repeat the
    last one). Also returns each row's last real index.
    """
    lengths = torch.tensor([len(row) for row in ids])
    width = int(lengths.max())
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    for r, row in enumerate(ids):
        input_ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
    new_mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
    offsets = torch.minimum(torch.arange(width)[None, :], (lengths - 1)[:, None])
    inputs = {"input_ids": input_ids, "attention_mask": torch.cat([prefix_mask, new_mask], dim=1),
              "position_ids": prefix_mask.sum(-1, keepdim=True) + offsets}
    return inputs, lengths - 1


def split_shared_prefix(ids: Sequence[Sequence[int]]) -> tuple[list[int], list[list[int]]]:
    """The longest common prefix of token-id lists, each text keeping at least one token of its own,
    and what is left of each. Split on token ids, so prefix + rest is each text's own tokenization."""
    shared, shortest = 0, min(len(row) for row in ids)
    while shared < shortest - 1 and all(row[shared] == ids[0][shared] for row in ids):
        shared += 1
    if shared == 0:
        raise ValueError("the texts of a group share no first token; a shared prefix needs one")
    return list(ids[0][:shared]), [list(row[shared:]) for row in ids]


# --- batched operations ---------------------------------------------------------

def _value_bytes(model: TaskModel, return_logits: bool) -> int:
    """Bytes one row brings back: a token id, or a row of float32 logits."""
    return 4 * int(model.hf.config.vocab_size) if return_logits else 8


def _token_ids(model: TaskModel, texts: Sequence[str]) -> list[list[int]]:
    """Each text's tokens as the tokenizer writes it alone (what :func:`encode` pads)."""
    return [list(row) for row in model.tokenizer(list(texts)).input_ids]


@torch.no_grad()
def next_tokens(model: TaskModel, texts: Sequence[str], batch_size: int = 64, phase: str = "predict",
                return_logits: bool = False) -> torch.Tensor:
    """Greedy next-token id for each text, (n,) long: one forward pass per text (Baseline's query-only
    prompts share nothing to cache).

    With ``return_logits`` the last-position logits instead, (n, vocab) float32 on CPU.
    """
    index = list(_length_batches(model, texts, batch_size))

    def step(want_logits):
        logits = next_token_logits(model)
        return logits.float() if want_logits else logits.argmax(-1)

    units = []
    for rows in index:
        enc = encode(model, [texts[i] for i in rows])
        units.append(_Unit((enc, step, return_logits), len(rows) * _value_bytes(model, return_logits),
                           _sent_bytes(enc), 1, len(rows), int(enc["attention_mask"].sum()), len(rows)))
    values = _requests(model, phase, units, _plain_session)
    out = torch.empty((len(texts), *values[0].shape[1:]), dtype=values[0].dtype)
    for rows, value in zip(index, values):
        out[rows] = value.cpu()
    return out


@torch.no_grad()
def prompt_states(model: TaskModel, groups: Sequence[Sequence[str]], batch_size: int = 64,
                  phase: str = "extract") -> tuple[torch.Tensor, torch.Tensor]:
    """For groups of texts that share a beginning (the demonstrations of one few-shot prompt, followed by
    each of its dummy queries, and by its query): the residual stream after every layer at each text's
    last token, (n_groups, k, n_layers, d_model) float32, and each text's greedy next token, (n_groups, k).

    Each group's shared prefix (the longest common run of token ids) is computed once, batched across
    groups; each text's own tokens then run on a copy of its group's key/value cache. Every group has
    the same number ``k`` of texts; a batch holds at most ``batch_size`` texts.
    """
    sizes = {len(g) for g in groups}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("every group needs the same, non-zero number of texts")
    (k,) = sizes
    pad = model.tokenizer.pad_token_id
    splits = [split_shared_prefix(_token_ids(model, group)) for group in groups]
    order = sorted(range(len(groups)), key=lambda g: len(splits[g][0]))  # similar lengths pad less
    per_unit = max(1, batch_size // k)
    row_bytes = 4 * model.n_layers * model.d_model + 8
    units, members = [], []
    for rows in _batches(len(order), per_unit):
        chosen = order[rows]
        prefix = _left_padded([splits[g][0] for g in chosen], pad)
        select = torch.arange(len(chosen)).repeat_interleave(k)  # group-major rows
        step, last = _continuation(prefix["attention_mask"][select], [t for g in chosen for t in splits[g][1]], pad)
        tokens = int(prefix["attention_mask"].sum()) + sum(len(t) for g in chosen for t in splits[g][1])
        units.append(_Unit((prefix, step, select, last), len(chosen) * k * row_bytes,
                           _sent_bytes(prefix, step, select, last), 2, len(chosen) * (k + 1), tokens, len(chosen) * k))
        members.append(chosen)
    values = _requests(model, phase, units, _prefix_session)
    states = torch.empty(len(groups), k, model.n_layers, model.d_model)
    ids = torch.empty(len(groups), k, dtype=torch.long)
    for chosen, (h, v) in zip(members, values):
        states[chosen] = h.cpu().float().view(len(chosen), k, model.n_layers, model.d_model)
        ids[chosen] = v.cpu().view(len(chosen), k)
    return states, ids


def hidden_states(model: TaskModel, texts: Sequence[str], batch_size: int = 64, phase: str = "extract") -> torch.Tensor:
    """Last-token residual stream after every layer, (n, n_layers, d_model), float32 on CPU."""
    return prompt_states(model, [[t] for t in texts], batch_size, phase)[0][:, 0]


def task_vectors(model: TaskModel, dummy_texts: Sequence[Sequence[str]], batch_size: int = 64,
                 phase: str = "extract") -> torch.Tensor:
    """θ for every prompt and layer, (n_prompts, n_layers, d_model): the mean over each prompt's dummy
    queries, their shared demonstrations computed once (:func:`prompt_states`)."""
    return prompt_states(model, dummy_texts, batch_size, phase)[0].mean(dim=1)


def task_vectors_and_answers(model: TaskModel, dummy_texts: Sequence[Sequence[str]], regular_texts: Sequence[str],
                             batch_size: int = 64, phase: str = "extract + regular") -> tuple[torch.Tensor, torch.Tensor]:
    """θ of each prompt (as :func:`task_vectors`) and its Regular answer (the next token after its
    demonstrations and real query), in one pass: the dummy prompts and the regular prompt share the
    demonstrations, computed once. Returns (n, n_layers, d_model) and (n,) token ids."""
    if len(dummy_texts) != len(regular_texts):
        raise ValueError("one regular text per prompt")
    states, ids = prompt_states(model, [list(d) + [r] for d, r in zip(dummy_texts, regular_texts)], batch_size, phase)
    return states[:, :-1].mean(dim=1), ids[:, -1]


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

    ``vectors``: (n_texts, n_layers, d_model), θ of every layer for each text (row i patches text
    i). Returns (len(layers), n_texts) token ids, or with ``return_logits`` (len(layers), n_texts,
    vocab) float32 logits.

    Below layer L a patched row is the text itself, and the patch touches only the last position:
    each text minus its last token runs once into a key/value cache (a text given several times, once), and every (text, layer) row
    feeds only the last token on a copy of that cache, θ written after its layer. A batch holds at
    most ``batch_size`` such rows (remotely also few enough that their θ fit in one request).
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
    ids = _token_ids(model, texts)
    if min(len(row) for row in ids) < 2:
        raise ValueError("every text needs at least two tokens (the cached part and the patched last token)")
    pad = model.tokenizer.pad_token_id
    order = sorted(range(n), key=lambda i: len(ids[i]))
    units, jobs_of = [], []
    for layer_rows in _batches(len(layers), batch_size):
        chosen_layers = list(range(len(layers)))[layer_rows]
        for text_rows in _batches(n, max(1, batch_size // len(chosen_layers))):
            chosen = order[text_rows]
            # Texts that repeat (the same query under several θ) share one cached prefix row.
            unique = list(dict.fromkeys(tuple(ids[i][:-1]) for i in chosen))
            row_of = {key: r for r, key in enumerate(unique)}
            prefix = _left_padded([list(key) for key in unique], pad)
            jobs = [(li, t) for li in chosen_layers for t in range(len(chosen))]  # layer-major: one block per layer
            select = torch.tensor([row_of[tuple(ids[chosen[t]][:-1])] for _, t in jobs])
            step, _ = _continuation(prefix["attention_mask"][select], [[ids[chosen[t]][-1]] for _, t in jobs], pad)
            plan = []
            for position, li in enumerate(chosen_layers):
                block = slice(position * len(chosen), (position + 1) * len(chosen))
                plan.append((layers[li], block, _placed(model, vectors[chosen, layers[li]])))
            plan.sort(key=lambda item: item[0])  # nnsight visits layers in execution order
            tokens = int(prefix["attention_mask"].sum()) + len(jobs)
            units.append(_Unit((prefix, step, select, plan, return_logits), len(jobs) * _value_bytes(model, return_logits),
                               _sent_bytes(prefix, step, select, extra=sum(int(t.numel() * 4) for _, _, t in plan)),
                               2, len(unique) + len(jobs), tokens, len(jobs)))
            jobs_of.append([(li, chosen[t]) for li, t in jobs])
    values = _requests(model, phase, units, _patched_session)
    result = torch.empty((len(layers), n, *values[0].shape[1:]), dtype=values[0].dtype)
    for jobs, value in zip(jobs_of, values):
        value = value.cpu()
        for row, (li, i) in enumerate(jobs):
            result[li, i] = value[row]
    return result


_STOP_IDS: dict[tuple[int, str], list[int]] = {}


def stop_token_ids(model: TaskModel, stop: str = "\n") -> list[int]:
    """Every token id whose text contains ``stop`` (a newline may come merged with other characters),
    and the end-of-sequence token: what ends a generated answer. Computed once per tokenizer."""
    tok = model.tokenizer
    key = (id(tok), stop)
    if key not in _STOP_IDS:
        texts = tok.batch_decode([[i] for i in range(len(tok))])
        ids = {i for i, text in enumerate(texts) if stop in text}
        if tok.eos_token_id is not None:
            ids.add(int(tok.eos_token_id))
        if not ids:
            raise ValueError(f"no token of this tokenizer contains the stop string {stop!r}")
        _STOP_IDS[key] = sorted(ids)
    return _STOP_IDS[key]


@torch.no_grad()
def generate(model: TaskModel, texts: Sequence[str], max_new_tokens: int, vectors: torch.Tensor | None = None,
             layer: int | None = None, stop: str = "\n", batch_size: int = 64, phase: str = "generate") -> list[list[int]]:
    """Greedy continuation of each text: at most ``max_new_tokens`` token ids, ending with the first
    token that contains ``stop`` (kept, so a merged token's text is not lost) or at the limit.

    With ``vectors`` (n_texts, d_model) and ``layer``: θ patched after ``layer`` at each text's last
    token (Hypothesis), in the prompt's forward only; the patched position stays in the key/value cache,
    so every later token attends to it. Batches are left padded (positions from the attention mask),
    so a batch gives the answers of its texts run one by one.
    """
    n = len(texts)
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if (vectors is None) != (layer is None):
        raise ValueError("give both vectors and layer (Hypothesis), or neither (Regular, Baseline)")
    if vectors is not None:
        if vectors.dim() != 2 or vectors.shape != (n, model.d_model):
            raise ValueError(f"vectors must be (n_texts={n}, d_model={model.d_model}), got {tuple(vectors.shape)}")
        if not 0 <= int(layer) < model.n_layers:
            raise ValueError(f"layer {layer} out of range for a model with {model.n_layers} layers")
    stop_ids = stop_token_ids(model, stop)
    if remote.is_remote(model.remote) and vectors is not None:  # the θ rows of a batch travel with the request
        batch_size = max(1, min(batch_size, REQUEST_BYTES // 2 // (4 * model.d_model)))
    index = list(_length_batches(model, texts, batch_size))
    units = []
    for rows in index:
        enc = encode(model, [texts[i] for i in rows])
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        theta = None if vectors is None else _placed(model, vectors[rows])
        sent = _sent_bytes(inputs) + (0 if theta is None else int(theta.numel()) * 4)
        units.append(_Unit((inputs, layer, theta, int(max_new_tokens), stop_ids), len(rows) * max_new_tokens * 8,
                           sent, 1, len(rows), int(enc["attention_mask"].sum()) + len(rows) * (max_new_tokens - 1),
                           len(rows) * max_new_tokens))
    values = _requests(model, phase, units, _generate_session)
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(n)]
    for rows, value in zip(index, values):
        for r, i in enumerate(rows):
            ids = []
            for token in value[r].tolist():
                ids.append(int(token))
                if token in stops:
                    break
            out[i] = ids
    return out


@torch.no_grad()
def vocab_logits(model: TaskModel, vectors: torch.Tensor) -> torch.Tensor:
    """Residual-stream vectors read through the final norm and the unembedding, (n, vocab) float32 on CPU.

    The model's own read-out, applied inside a trace (on a one-token input), so it runs wherever
    the model does, NDIF included. ``vectors``: (n, d_model).
    """
    if vectors.dim() != 2 or vectors.shape[1] != model.d_model:
        raise ValueError(f"vectors must be (n, d_model={model.d_model}), got {tuple(vectors.shape)}")
    theta = _placed(model, vectors)
    enc = encode(model, [model.tokenizer.decode([model.tokenizer.pad_token_id])])
    norm = model.arch.get(model.nn, model.arch.final_norm)
    unembed = model.arch.get(model.nn, model.arch.unembed)

    def step(vectors):
        return unembed(norm(vectors[:, None, :]))[:, -1].float()

    unit = _Unit((enc, step, theta), _value_bytes(model, True) * len(theta), _sent_bytes(enc, theta), 1, 1, 1,
                 len(theta))
    return _requests(model, "vocab", [unit], _plain_session)[0].cpu()
