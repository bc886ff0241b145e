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

import contextvars
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import nnsight
import torch

from . import remote
from .arch import UnsupportedArchitectureError, residual
from .compat import select_cache_rows
from .models import TaskModel


@dataclass
class Usage:
    """What the model was asked to do, for the benchmark: requests, traces, rows, real tokens, seconds.

    A request is one round trip: a session of one or more traces (on NDIF, one HTTP request).
    ``by_phase`` maps a phase name to its counts (``requests``, ``traces``, ``rows``, ``tokens``,
    ``heads``, ``seconds``). Get one from :func:`track_usage`; nothing is counted outside such a scope.
    """

    by_phase: dict = field(default_factory=dict)

    def add(self, phase: str, *, traces: int, rows: int, tokens: int, heads: int, seconds: float) -> None:
        """Count one request of ``phase``: its traces, the rows they run, the tokens computed (new
        tokens only: a step on a key/value cache does not recompute the cached ones), the rows read
        out through the unembedding (``heads``) and its wall time."""
        entry = self.by_phase.setdefault(phase, {"requests": 0, "traces": 0, "rows": 0, "tokens": 0, "heads": 0,
                                                 "seconds": 0.0})
        entry["requests"] += 1
        entry["traces"] += traces
        entry["rows"] += rows
        entry["tokens"] += tokens
        entry["heads"] += heads
        entry["seconds"] += seconds

    def total(self, key: str) -> float:
        return sum(entry[key] for entry in self.by_phase.values())


# The Usage objects of the track_usage scopes open in this context (innermost last).
_TRACKING: contextvars.ContextVar[tuple[Usage, ...]] = contextvars.ContextVar("taskvec_usage", default=())


@contextmanager
def track_usage() -> Iterator[Usage]:
    """Count the requests made inside this block: ``with track_usage() as usage: ...``, then read
    ``usage.by_phase``. Scopes nest (an outer one counts what an inner one does) and follow the
    context (:mod:`contextvars`), so concurrent runs do not count each other's requests. A request
    that fails is not counted."""
    usage = Usage()
    token = _TRACKING.set(_TRACKING.get() + (usage,))
    try:
        yield usage
    finally:
        _TRACKING.reset(token)


@contextmanager
def _counted(phase: str, *, traces: int, rows: int, tokens: int, heads: int):
    """Time one request of ``phase`` and add it to every open :func:`track_usage` scope (if it succeeds)."""
    trackers = _TRACKING.get()
    if not trackers:
        yield
        return
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():  # kernels run asynchronously: wait before reading the clock
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    for usage in trackers:
        usage.add(phase, traces=traces, rows=rows, tokens=tokens, heads=heads, seconds=seconds)


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


def patch_last_token(model: TaskModel, layer: int, vectors: torch.Tensor, rows: slice = slice(None),
                     add: bool = False) -> None:
    """Inside a trace: overwrite (or with ``add``, add to) the last token's residual stream after ``layer``
    for ``rows``.

    ``vectors`` is (len(rows), d_model) or (d_model,), already on the model's device.
    The write is in place on the tensor the next layer receives, so it propagates.
    """
    hidden = residual(model.arch.layer_modules(model.nn)[layer].output)
    if add:
        hidden[rows, -1, :] += vectors
    else:
        hidden[rows, -1, :] = vectors


def next_token_logits(model: TaskModel) -> torch.Tensor:
    """Inside a trace: the unembedding's output at the last position, (batch, vocab). The model's logits
    are this after :meth:`taskvec.arch.Arch.finish_logits` (a scale or soft cap; the argmax is the same)."""
    return model.arch.get(model.nn, model.arch.unembed).output[:, -1, :]


def last_token_heads(model: TaskModel, layer: int) -> torch.Tensor:
    """Inside a trace: each attention head's output at the last token in ``layer``, before the attention
    output projection (the projection's input split into heads), (batch, n_heads, head_dim)."""
    n_heads, head_dim = model.arch.head_shape(layer)
    heads = model.arch.head_module(model.nn, layer).input
    return heads[:, -1, :].reshape(heads.shape[0], n_heads, head_dim)


def patch_last_token_heads(model: TaskModel, layer: int, heads: Sequence[int], values: torch.Tensor,
                           rows: slice = slice(None)) -> None:
    """Inside a trace: overwrite the last token's output of ``heads`` in ``layer`` for ``rows`` (before the
    attention output projection, which then mixes them into the residual stream as the model would).

    ``values`` is (len(rows), len(heads), head_dim), or (len(heads), head_dim) for the same values in every
    row, already on the model's device. One call per layer and trace: nnsight hands out a module's input
    once per forward (:func:`_write_heads` writes several blocks of rows through one access).
    """
    _write_heads(model, layer, model.arch.head_module(model.nn, layer).input, [(heads, values, rows)])


def _write_heads_at(model: TaskModel, layer: int, inputs: torch.Tensor, rows: torch.Tensor, positions: torch.Tensor,
                    heads: Sequence[int], values: torch.Tensor) -> None:
    """Write ``values`` (len(heads), head_dim) into ``inputs`` (the input of ``layer``'s output projection) at
    each row's own position (right-padded texts end at different positions)."""
    _, head_dim = model.arch.head_shape(layer)
    for j, head in enumerate(heads):
        inputs[rows, positions, head * head_dim:(head + 1) * head_dim] = values[j]


def _write_heads(model: TaskModel, layer: int, inputs: torch.Tensor, writes) -> None:
    """Write ``(heads, values, rows)`` blocks into ``inputs``, the input of ``layer``'s output projection."""
    _, head_dim = model.arch.head_shape(layer)
    for heads, values, rows in writes:
        for j, head in enumerate(heads):
            inputs[rows, -1, head * head_dim:(head + 1) * head_dim] = values[..., j, :]


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


@dataclass(frozen=True, kw_only=True)
class _Unit:
    """One piece of a phase: the payload its session function receives, and what it costs.

    The costs decide how units are bundled into requests (:func:`_requests`) and are what
    :func:`track_usage` counts; only ``payload`` travels.
    """

    payload: Any  #: the payload class of the phase's session function (PlainPayload, PatchedPayload, ...)
    result_bytes: int  #: bytes it brings back
    sent_bytes: int  #: bytes it sends (inputs, θ)
    traces: int  #: traces it runs
    rows: int  #: batch rows over all its traces
    tokens: int  #: tokens computed (cached ones are not recomputed)
    heads: int  #: rows read out through the unembedding


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
        counts = {key: sum(getattr(u, key) for u in members) for key in ("traces", "rows", "tokens", "heads")}
        with _counted(phase, **counts), remote.where(phase=phase):
            values = remote.call(lambda: session(model, payloads), model.remote, model.name)
        out.extend(values)
    return out


#: ``logits_to_keep`` for a pass that only fills a key/value cache: no position reaches the unembedding
#: (262,144 wide for Gemma 3, as costly per row as the rest of the model).
NO_LOGITS = torch.tensor([], dtype=torch.long)


# --- payloads: what each session function receives, one per unit ---------------------------------
# A payload travels inside its session: remotely it is pickled with the traced block and rebuilt on
# the server, its class by value with taskvec's source (remote.ship_code). nnsight ships functions
# by their source, but the methods dataclasses and namedtuples generate have none: they travel as
# the client Python's bytecode, which the server (Python 3.12 in tests/ndif_server.py, 3.11 here)
# cannot run (it crashes). So payloads are frozen dataclasses with no generated method the server
# could call: pickle rebuilds an instance by filling its __dict__ (a NamedTuple would call its
# generated __new__), and eq=False, repr=False leave __eq__, __hash__ and __repr__ to object.
# Inputs are dicts of (rows, seq) long tensors: input_ids, attention_mask (and position_ids).
_WIRE = dict(frozen=True, kw_only=True, eq=False, repr=False)


@dataclass(**_WIRE)
class PlainPayload:
    """One trace of :func:`_plain_session`: the next token of each row, nothing cached or patched."""

    inputs: dict[str, torch.Tensor]  #: left padded (rows, seq), with mask-derived position_ids (:func:`encode`)
    want_logits: bool  #: return (rows, vocab) float32 logits instead of (rows,) token ids


@dataclass(**_WIRE)
class VocabPayload:
    """One trace of :func:`_vocab_session`: vectors read through the final norm and the unembedding."""

    inputs: dict[str, torch.Tensor]  #: a one-token input, (1, 1): the trace only gives the read-out a place to run
    vectors: torch.Tensor  #: (n, d_model), placed for the model (:func:`_placed`)


@dataclass(**_WIRE)
class HeadsPayload:
    """One trace of :func:`_heads_session`: each head's output at the last token, in ``layers``."""

    inputs: dict[str, torch.Tensor]  #: left padded (rows, seq), with mask-derived position_ids (:func:`encode`)
    layers: tuple[int, ...]  #: the layers read, in order


@dataclass(**_WIRE)
class ProjectPayload:
    """One trace of :func:`_project_session`: head outputs put through their layer's output projection."""

    inputs: dict[str, torch.Tensor]  #: a one-token input, (1, 1): the trace only gives the projections a place to run
    items: tuple  #: (layer, x, full): x (n, n_heads * head_dim) placed for the model (:func:`_placed`); full
    #: (1, n_heads * head_dim), the heads whose summed projection fixes the scale of the layer's attention-output
    #: norm (``arch.head_norm``), or None without one
    eps: float = 0.0  #: that norm's epsilon


@dataclass(**_WIRE)
class Patch:
    """θ written after one layer into one block of a step's rows (:class:`PatchedPayload`), or with
    ``heads`` the outputs of those attention heads of the layer (before its output projection)."""

    layer: int  #: the decoder layer after which θ is written (or whose heads are written)
    rows: slice  #: the step rows it goes to
    theta: torch.Tensor  #: (len(rows), d_model), or (len(rows), len(heads), head_dim); placed (:func:`_placed`)
    heads: tuple[int, ...] | None = None  #: the heads written, or None for the residual stream after the layer
    add: bool = False  #: add θ to the residual stream instead of replacing it (not for heads)


@dataclass(**_WIRE)
class PatchedPayload:
    """Two traces of :func:`_patched_session`: ``prefix`` fills a key/value cache; the one-token
    ``step`` runs on ``rows`` of it with θ written as ``patches`` say, and its next token is read."""

    prefix: dict[str, torch.Tensor]  #: (n_prefix, prefix_len) left padded: each distinct text minus its last token
    step: dict[str, torch.Tensor]  #: input_ids, position_ids (n_rows, 1); attention_mask (n_rows, prefix_len + 1)
    rows: torch.Tensor  #: (n_rows,) long: the prefix row each step row continues
    patches: tuple[Patch, ...]  #: in execution order (:func:`_execution_order`): nnsight visits modules so
    want_logits: bool  #: return (n_rows, vocab) float32 logits instead of (n_rows,) token ids
    targets: torch.Tensor | None = None  #: (n_rows,) long: return each row's probability of its target instead


@dataclass(**_WIRE)
class PrefixPayload:
    """Two traces of :func:`_prefix_session`: the groups' shared prefixes fill a key/value cache;
    each text's own tokens run on its group's row of it (:func:`_continuation`)."""

    prefix: dict[str, torch.Tensor]  #: (n_groups, prefix_len) left padded: each group's shared prefix
    step: dict[str, torch.Tensor]  #: input_ids, position_ids (n_rows, rest_len) right padded; attention_mask (n_rows, prefix_len + rest_len)
    rows: torch.Tensor  #: (n_rows,) long, group-major: the prefix row each text continues
    last: torch.Tensor  #: (n_rows,) long: the index in ``step`` of each text's last real token
    #: (layer, heads, values) blocks: those heads' outputs at each text's last token set to values,
    #: (len(heads), head_dim) placed for the model, the same in every row (:func:`prompt_states`' ``heads``)
    heads: tuple = ()


@dataclass(**_WIRE)
class GeneratePayload:
    """One greedy ``generate`` trace of :func:`_generate_session`, θ optionally patched in the prompt's forward."""

    inputs: dict[str, torch.Tensor]  #: input_ids, attention_mask (rows, seq) left padded
    max_new_tokens: int  #: the most tokens generated per row
    stop_ids: list[int]  #: token ids that end a row (:func:`stop_token_ids`)
    layer: int | None = None  #: the layer after which θ is written, or None for no patch
    theta: torch.Tensor | None = None  #: (rows, d_model) placed for the model (:func:`_placed`), or None
    every: bool = False  #: θ written at every step's new position, not only the prompt's last (``patch="every"``)


# --- sessions: each runs its payloads' traces in one nnsight session (remotely: one request) ---------
# The session is submitted when it exits and collected by remote.wait (bounded) when remote.
# nnsight reads a trace's body from its source: trace headers stay on one line, and no comment
# line opens a with-block.

def _plain_session(model: TaskModel, payloads: Sequence[PlainPayload]) -> list:
    """One trace per payload; per payload (rows,) next-token ids or (rows, vocab) float32 logits."""
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            with model.nn.trace(payload.inputs, logits_to_keep=1):
                logits = next_token_logits(model)
                values.append(logits.float() if payload.want_logits else logits.argmax(-1))
    return remote.wait(job)["values"] if job is not None else values


def _heads_session(model: TaskModel, payloads: Sequence[HeadsPayload]) -> list:
    """One trace per payload; per payload a list, per layer read, of (rows, n_heads, head_dim) float32."""
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            with model.nn.trace(payload.inputs, logits_to_keep=NO_LOGITS):
                values.append([last_token_heads(model, layer).float() for layer in payload.layers])
    return remote.wait(job)["values"] if job is not None else values


def _project_session(model: TaskModel, payloads: Sequence[ProjectPayload]) -> list:
    """One trace per payload; per payload a list, per item, of (n, d_model) float32: each row's projection
    minus the projection of zeros (so a bias is not counted as the heads' output)."""
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            with model.nn.trace(payload.inputs, logits_to_keep=1):
                out = []
                for layer, x, full in payload.items:
                    proj = model.arch.head_module(model.nn, layer)
                    share = (proj(x) - proj(torch.zeros_like(x[:1]))).float()
                    if full is not None:  # the norm's output times the share's RMS is its input times the weight
                        norm = model.arch.get(model.arch.layer_modules(model.nn)[layer], model.arch.head_norm)
                        rms = (share.pow(2).mean(-1, keepdim=True) + payload.eps).sqrt()
                        scale = (proj(full).float().pow(2).mean(-1, keepdim=True) + payload.eps).sqrt()
                        share = norm(share[:, None, :])[:, 0].float() * rms / scale
                    out.append(share)
                values.append(out)
    return remote.wait(job)["values"] if job is not None else values


def _vocab_session(model: TaskModel, payloads: Sequence[VocabPayload]) -> list:
    """One trace per payload; per payload the vectors' logits, (n, vocab) float32."""
    norm = model.arch.get(model.nn, model.arch.final_norm)
    unembed = model.arch.get(model.nn, model.arch.unembed)
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            with model.nn.trace(payload.inputs, logits_to_keep=1):
                values.append(unembed(norm(payload.vectors[:, None, :]))[:, -1].float())
    return remote.wait(job)["values"] if job is not None else values


def _patched_session(model: TaskModel, payloads: Sequence[PatchedPayload]) -> list:
    """Two traces per payload; per payload (n_rows,) next-token ids or (n_rows, vocab) float32 logits."""
    unembed = model.arch.get(model.nn, model.arch.unembed)
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            with model.nn.trace(payload.prefix, use_cache=True, logits_to_keep=NO_LOGITS):
                cache = model.nn.output.past_key_values
            with model.nn.trace(payload.step, past_key_values=select_cache_rows(cache, payload.rows), use_cache=True, logits_to_keep=1):
                done = 0
                while done < len(payload.patches):
                    patch = payload.patches[done]
                    if patch.heads is None:
                        patch_last_token(model, patch.layer, patch.theta, patch.rows, patch.add)
                        done += 1
                        continue
                    group = [p for p in payload.patches[done:] if p.heads is not None and p.layer == patch.layer]
                    _write_heads(model, patch.layer, model.arch.head_module(model.nn, patch.layer).input, [(p.heads, p.theta, p.rows) for p in group])
                    done += len(group)
                logits = unembed.output[:, -1, :]
                if payload.targets is not None:
                    values.append(model.arch.finish_logits(logits.float()).softmax(-1)[torch.arange(len(payload.targets)), payload.targets])
                else:
                    values.append(logits.float() if payload.want_logits else logits.argmax(-1))
    return remote.wait(job)["values"] if job is not None else values


def _prefix_session(model: TaskModel, payloads: Sequence[PrefixPayload]) -> list:
    """Two traces per payload; per payload (states after every layer at each text's last token,
    (n_rows, n_layers, d_model) float32, and each text's next-token id, (n_rows,))."""
    layer_modules = model.arch.layer_modules(model.nn)
    unembed = model.arch.get(model.nn, model.arch.unembed)
    top = model.n_layers - 1
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            at = torch.arange(len(payload.last))
            with model.nn.trace(payload.prefix, use_cache=True, logits_to_keep=NO_LOGITS):
                cache = model.nn.output.past_key_values
            with model.nn.trace(payload.step, past_key_values=select_cache_rows(cache, payload.rows), use_cache=True, logits_to_keep=1):
                reads = []
                for layer in range(top + 1):
                    for at_layer, heads, head_values in payload.heads:
                        if at_layer == layer:
                            _write_heads_at(model, layer, model.arch.head_module(model.nn, layer).input, at, payload.last, heads, head_values)
                    hidden = residual(layer_modules[layer].output)
                    reads.append(hidden[at, payload.last])
                    if layer == top:
                        hidden[at, -1] = hidden[at, payload.last]
                values.append((torch.stack(reads, dim=1).float(), unembed.output[:, -1, :].argmax(-1)))
    return remote.wait(job)["values"] if job is not None else values


def _generate_session(model: TaskModel, payloads: Sequence[GeneratePayload]) -> list:
    """One greedy ``generate`` trace per payload; per payload the generated ids, (rows, <= max_new_tokens).

    With ``theta``, the residual stream after ``layer`` at each row's last prompt token is
    overwritten in the first forward only (the prompt's); the patched position then stays in the
    key/value cache for every later token. With ``every``, the last position of every forward is
    overwritten. A loop over steps must get every step it names (nnsight skips what follows a loop cut
    short), so that run does not stop at a stop token: it always makes ``max_new_tokens`` steps, and
    :func:`generate` cuts each row at its first stop token, as greedy rows are independent.
    """
    layer_modules = model.arch.layer_modules(model.nn)
    pad = model.tokenizer.pad_token_id
    job = remote.backend(model.nn, model.remote)
    with model.nn.session(backend=job, remote=model.remote):
        values = nnsight.save([])
        for payload in payloads:
            width = payload.inputs["input_ids"].shape[1]
            steps = payload.max_new_tokens if payload.every else 1
            stops = None if payload.every else payload.stop_ids
            with model.nn.generate(payload.inputs, max_new_tokens=payload.max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad) as tracer:
                if payload.theta is not None:
                    for step in tracer.iter[0:steps]:
                        residual(layer_modules[payload.layer].output)[:, -1, :] = payload.theta
                values.append(tracer.result[:, width:])
    return remote.wait(job)["values"] if job is not None else values


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
    return 4 * model.arch.vocab_size if return_logits else 8


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
    units = []
    for rows in index:
        enc = encode(model, [texts[i] for i in rows])
        units.append(_Unit(payload=PlainPayload(inputs=enc, want_logits=return_logits),
                           result_bytes=len(rows) * _value_bytes(model, return_logits), sent_bytes=_sent_bytes(enc),
                           traces=1, rows=len(rows), tokens=int(enc["attention_mask"].sum()), heads=len(rows)))
    values = _requests(model, phase, units, _plain_session)
    out = torch.empty((len(texts), *values[0].shape[1:]), dtype=values[0].dtype)
    for rows, value in zip(index, values):
        out[rows] = value.cpu()
    return model.arch.finish_logits(out) if return_logits else out


@torch.no_grad()
def prompt_states(model: TaskModel, groups: Sequence[Sequence[str]], batch_size: int = 64,
                  phase: str = "extract", heads: Mapping[int, tuple[Sequence[int], torch.Tensor]] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For groups of texts that share a beginning (the demonstrations of one few-shot prompt, followed by
    each of its dummy queries, and by its query): the residual stream after every layer at each text's
    last token, (n_groups, k, n_layers, d_model) float32, and each text's greedy next token, (n_groups, k).

    Each group's shared prefix (the longest common run of token ids) is computed once, batched across
    groups; each text's own tokens then run on a copy of its group's key/value cache. Every group has
    the same number ``k`` of texts; a batch holds at most ``batch_size`` texts.

    ``heads``: layer -> (heads, values (len(heads), head_dim)): those attention heads' outputs at each text's
    last token are set to ``values`` (before the output projection), in every text, while its states are read
    (an ablation: θ read without what those heads write at the last token).
    """
    writes = tuple((int(layer), tuple(int(h) for h in ids), _placed(model, values))
                   for layer, (ids, values) in sorted((heads or {}).items()))
    for layer, ids, values in writes:
        _, head_dim = _check_heads(model, layer, list(ids))
        if tuple(values.shape) != (len(ids), head_dim):
            raise ValueError(f"the values of layer {layer}'s heads must be ({len(ids)}, {head_dim}), got {tuple(values.shape)}")
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
        units.append(_Unit(payload=PrefixPayload(prefix=prefix, step=step, rows=select, last=last, heads=writes),
                           result_bytes=len(chosen) * k * row_bytes,
                           sent_bytes=_sent_bytes(prefix, step, select, last, *[v for _, _, v in writes]),
                           traces=2, rows=len(chosen) * (k + 1), tokens=tokens, heads=len(chosen) * k))
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
                 phase: str = "extract", heads: Mapping[int, tuple[Sequence[int], torch.Tensor]] | None = None,
                 ) -> torch.Tensor:
    """θ for every prompt and layer, (n_prompts, n_layers, d_model): the mean over each prompt's dummy
    queries, their shared demonstrations computed once (:func:`prompt_states`; ``heads`` as there)."""
    return prompt_states(model, dummy_texts, batch_size, phase, heads)[0].mean(dim=1)


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
                        batch_size: int = 256, phase: str = "patch", return_logits: bool = False,
                        add: bool = False) -> torch.Tensor:
    """Next token of each text with θ patched at the last token after each of ``layers`` (replacing the
    residual stream there, as the paper does; with ``add``, added to it, as a function vector is).

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
            patches = []
            for position, li in enumerate(chosen_layers):
                block = slice(position * len(chosen), (position + 1) * len(chosen))
                patches.append(Patch(layer=layers[li], rows=block, theta=_placed(model, vectors[chosen, layers[li]]),
                                     add=add))
            patches.sort(key=_execution_order)
            tokens = int(prefix["attention_mask"].sum()) + len(jobs)
            payload = PatchedPayload(prefix=prefix, step=step, rows=select, patches=tuple(patches),
                                     want_logits=return_logits)
            units.append(_Unit(payload=payload, result_bytes=len(jobs) * _value_bytes(model, return_logits),
                               sent_bytes=_sent_bytes(prefix, step, select,
                                                      extra=sum(int(p.theta.numel() * 4) for p in patches)),
                               traces=2, rows=len(unique) + len(jobs), tokens=tokens, heads=len(jobs)))
            jobs_of.append([(li, chosen[t]) for li, t in jobs])
    values = _requests(model, phase, units, _patched_session)
    result = torch.empty((len(layers), n, *values[0].shape[1:]), dtype=values[0].dtype)
    for jobs, value in zip(jobs_of, values):
        value = value.cpu()
        for row, (li, i) in enumerate(jobs):
            result[li, i] = value[row]
    return model.arch.finish_logits(result) if return_logits else result


def _execution_order(patch: Patch) -> tuple[int, int]:
    """Where a patch's module runs in the forward: by layer, a layer's heads (inside its attention) before
    its output. nnsight visits modules in that order, so a trace's writes must come in it."""
    return patch.layer, 0 if patch.heads is not None else 1


def _check_heads(model: TaskModel, layer: int, heads: Sequence[int] | None = None) -> tuple[int, int]:
    if not 0 <= layer < model.n_layers:
        raise ValueError(f"layer {layer} out of range for a model with {model.n_layers} layers")
    n_heads, head_dim = model.arch.head_shape(layer)
    bad = [h for h in (heads or ()) if not 0 <= h < n_heads]
    if bad:
        raise ValueError(f"heads {bad} out of range for layer {layer}'s {n_heads} heads")
    if heads is not None and len(set(heads)) != len(heads):
        raise ValueError(f"heads must not repeat, got {list(heads)}")
    return n_heads, head_dim


@torch.no_grad()
def head_outputs(model: TaskModel, texts: Sequence[str], layers: Sequence[int] | None = None, batch_size: int = 64,
                 phase: str = "heads") -> list[torch.Tensor]:
    """Each attention head's output at each text's last token, before the attention output projection:
    one (n_texts, n_heads, head_dim) float32 tensor per layer of ``layers`` (default: all), in order.
    Layers may differ in head shape (Gemma 4's global layers have wider heads), hence a list."""
    layers = list(range(model.n_layers) if layers is None else layers)
    shapes = [_check_heads(model, layer) for layer in layers]
    index = list(_length_batches(model, texts, batch_size))
    units = []
    for rows in index:
        enc = encode(model, [texts[i] for i in rows])
        units.append(_Unit(payload=HeadsPayload(inputs=enc, layers=tuple(layers)),
                           result_bytes=len(rows) * sum(4 * h * d for h, d in shapes), sent_bytes=_sent_bytes(enc),
                           traces=1, rows=len(rows), tokens=int(enc["attention_mask"].sum()), heads=0))
    values = _requests(model, phase, units, _heads_session)
    out = [torch.empty(len(texts), h, d) for h, d in shapes]
    for rows, value in zip(index, values):
        for j, tensor in enumerate(value):
            out[j][rows] = tensor.cpu().float()
    return out


@torch.no_grad()
def head_patched_next_tokens(model: TaskModel, texts: Sequence[str], layer: int, heads: Sequence[int],
                             values: torch.Tensor, batch_size: int = 64, phase: str = "head patch",
                             return_logits: bool = False) -> torch.Tensor:
    """Next token of each text with the outputs of ``heads`` in ``layer`` at its last token replaced.

    ``values``: (n_texts, len(heads), head_dim), row i written into text i. Returns (n_texts,) token ids
    or, with ``return_logits``, (n_texts, vocab) float32 logits. Each text minus its last token runs once
    into a key/value cache, and only the last token is recomputed with the write (as
    :func:`patched_next_tokens`).
    """
    n = len(texts)
    heads = [int(h) for h in heads]
    _, head_dim = _check_heads(model, layer, heads)
    if values.shape != (n, len(heads), head_dim):
        raise ValueError(f"values must be (n_texts={n}, n_heads={len(heads)}, head_dim={head_dim}), "
                         f"got {tuple(values.shape)}")
    ids = _token_ids(model, texts)
    if min(len(row) for row in ids) < 2:
        raise ValueError("every text needs at least two tokens (the cached part and the patched last token)")
    if remote.is_remote(model.remote):  # the values of a batch travel with the request
        batch_size = max(1, min(batch_size, REQUEST_BYTES // 2 // (4 * len(heads) * head_dim)))
    pad = model.tokenizer.pad_token_id
    order = sorted(range(n), key=lambda i: len(ids[i]))
    units, members = [], []
    for rows in _batches(n, batch_size):
        chosen = order[rows]
        prefix = _left_padded([ids[i][:-1] for i in chosen], pad)
        select = torch.arange(len(chosen))
        step, _ = _continuation(prefix["attention_mask"], [[ids[i][-1]] for i in chosen], pad)
        patch = Patch(layer=int(layer), rows=slice(None), theta=_placed(model, values[chosen]), heads=tuple(heads))
        payload = PatchedPayload(prefix=prefix, step=step, rows=select, patches=(patch,), want_logits=return_logits)
        units.append(_Unit(payload=payload, result_bytes=len(chosen) * _value_bytes(model, return_logits),
                           sent_bytes=_sent_bytes(prefix, step, select, extra=int(patch.theta.numel()) * 4),
                           traces=2, rows=2 * len(chosen), tokens=int(prefix["attention_mask"].sum()) + len(chosen),
                           heads=len(chosen)))
        members.append(chosen)
    results = _requests(model, phase, units, _patched_session)
    out = torch.empty((n, *results[0].shape[1:]), dtype=results[0].dtype)
    for chosen, value in zip(members, results):
        out[chosen] = value.cpu()
    return model.arch.finish_logits(out) if return_logits else out


@torch.no_grad()
def head_sweep_probs(model: TaskModel, texts: Sequence[str], targets: Sequence[int], values: Sequence[torch.Tensor],
                     layers: Sequence[int] | None = None, batch_size: int = 256,
                     phase: str = "head sweep") -> tuple[torch.Tensor, torch.Tensor]:
    """Each text's probability of its target token at the last position, clean and with one head replaced.

    ``values[j]``: (n_heads, head_dim) for ``layers[j]`` (default: all layers), the output each head is set
    to at the last token (the same in every text, e.g. the head's mean over in-context prompts). Returns
    (clean (n_texts,), patched (n_texts, len(layers), n_heads)) float32: in patched ``[i, j, h]`` only head
    ``h`` of ``layers[j]`` is replaced (NaN where that layer has fewer heads). Each text minus its last token
    runs once into a key/value cache; every (text, head) row recomputes only the last token, and the
    probabilities are computed where the model runs (no vocabulary-wide logits travel).
    """
    n = len(texts)
    layers = list(range(model.n_layers) if layers is None else layers)
    if len(values) != len(layers):
        raise ValueError(f"one (n_heads, head_dim) tensor of values per layer ({len(layers)}), got {len(values)}")
    for layer, value in zip(layers, values):
        shape = _check_heads(model, layer)
        if tuple(value.shape) != shape:
            raise ValueError(f"values for layer {layer} must be (n_heads, head_dim)={shape}, got {tuple(value.shape)}")
    if len(targets) != n:
        raise ValueError(f"one target token per text ({n}), got {len(targets)}")
    ids = _token_ids(model, texts)
    if min(len(row) for row in ids) < 2:
        raise ValueError("every text needs at least two tokens (the cached part and the patched last token)")
    blocks = [(j, h) for j, layer in enumerate(layers) for h in range(values[j].shape[0])]  # one per head
    pad = model.tokenizer.pad_token_id
    placed = [_placed(model, value) for value in values]
    value_bytes = sum(int(v.numel()) * 4 for v in placed)
    order = sorted(range(n), key=lambda i: len(ids[i]))
    units, members = [], []
    for rows in _batches(n, max(1, batch_size // (len(blocks) + 1))):
        chosen = order[rows]
        k = len(chosen)
        prefix = _left_padded([ids[i][:-1] for i in chosen], pad)
        select = torch.arange(k).repeat(len(blocks) + 1)  # block-major: clean rows, then one block per head
        step, _ = _continuation(prefix["attention_mask"][select], [[ids[chosen[t]][-1]] for t in select.tolist()], pad)
        patches = tuple(Patch(layer=layers[j], rows=slice((b + 1) * k, (b + 2) * k), theta=placed[j][h:h + 1].clone(),
                              heads=(h,)) for b, (j, h) in enumerate(blocks))
        wanted = torch.tensor([int(targets[chosen[t]]) for t in select.tolist()], dtype=torch.long)
        payload = PatchedPayload(prefix=prefix, step=step, rows=select, patches=patches, want_logits=False,
                                 targets=wanted)
        units.append(_Unit(payload=payload, result_bytes=len(select) * 4,
                           sent_bytes=_sent_bytes(prefix, step, select, wanted, extra=value_bytes),
                           traces=2, rows=k + len(select), tokens=int(prefix["attention_mask"].sum()) + len(select),
                           heads=len(select)))
        members.append(chosen)
    results = _requests(model, phase, units, _patched_session)
    clean = torch.empty(n)
    patched = torch.full((n, len(layers), max(v.shape[0] for v in values)), float("nan"))  # NaN: no such head
    for chosen, value in zip(members, results):
        grid = value.cpu().float().view(len(blocks) + 1, len(chosen))
        clean[chosen] = grid[0]
        for b, (j, h) in enumerate(blocks):
            patched[chosen, j, h] = grid[b + 1]
    return clean, patched


@torch.no_grad()
def head_contributions(model: TaskModel, heads: Sequence[tuple[int, int]], values: Sequence[torch.Tensor],
                       context: Mapping[int, torch.Tensor] | Sequence[torch.Tensor] | None = None) -> torch.Tensor:
    """What each head adds to the residual stream when its output is ``values[i]``: (len(heads), d_model).

    ``heads``: (layer, head) pairs; ``values[i]``: (head_dim,). Each value is put alone (the layer's other
    heads at zero) through its layer's attention output projection, inside a trace so it runs wherever the
    model does; a bias of the projection is not counted. The sum over a task's top heads of their mean
    outputs so projected is the function vector of Todd et al. (2024).

    Where a block normalises its attention output before the residual stream (``arch.head_norm``: Gemma 2
    to 4, OLMo 2 and 3, ...), that norm divides all heads together by the root mean square of their summed
    projection, so one head's share depends on the others. ``context[layer]``, (n_heads, head_dim), gives
    the outputs of all the layer's heads that fix that scale (for a function vector: every head's mean), and
    a head's share is its projection times the norm's weight over that scale: the shares of all heads (and
    the bias's) then sum to the norm's output for ``context`` exactly. Such a layer without ``context`` is an
    error.
    """
    if len(heads) != len(values):
        raise ValueError(f"one value per head ({len(heads)}), got {len(values)}")
    by_layer: dict[int, list[int]] = {}
    rows = []
    for i, ((layer, head), value) in enumerate(zip(heads, values)):
        n_heads, head_dim = _check_heads(model, int(layer), [int(head)])
        if tuple(value.shape) != (head_dim,):
            raise ValueError(f"the value of head ({layer}, {head}) must be (head_dim={head_dim},), got {tuple(value.shape)}")
        x = torch.zeros(n_heads * head_dim)
        x[int(head) * head_dim:(int(head) + 1) * head_dim] = value.float()
        by_layer.setdefault(int(layer), []).append(i)
        rows.append(x)
    if not rows:
        return torch.empty(0, model.d_model)
    scales = {}
    if model.arch.head_norm:
        for layer in by_layer:
            if context is None or (isinstance(context, Mapping) and layer not in context):
                raise ValueError(f"{model.arch.family}: the attention output of layer {layer} goes through "
                                 f"'{model.arch.head_norm}' before the residual stream, so a head's share needs "
                                 "the outputs of all its heads (context) to fix the norm's scale")
            full = context[layer]
            if tuple(full.shape) != model.arch.head_shape(layer):
                raise ValueError(f"context[{layer}] must be (n_heads, head_dim)={model.arch.head_shape(layer)}, "
                                 f"got {tuple(full.shape)}")
            scales[layer] = _placed(model, full.reshape(1, -1))
    items = tuple((layer, _placed(model, torch.stack([rows[i] for i in members])), scales.get(layer))
                  for layer, members in by_layer.items())
    enc = encode(model, [model.tokenizer.decode([model.tokenizer.pad_token_id])])
    unit = _Unit(payload=ProjectPayload(inputs=enc, items=items, eps=_head_norm_eps(model)),
                 result_bytes=4 * model.d_model * len(rows),
                 sent_bytes=_sent_bytes(enc, *[x for _, x, _ in items]), traces=1, rows=1, tokens=1, heads=0)
    results = _requests(model, "head contributions", [unit], _project_session)[0]
    out = torch.empty(len(rows), model.d_model)
    for (layer, members), value in zip(by_layer.items(), results):
        out[members] = value.cpu().float()
    return out


def _head_norm_eps(model: TaskModel) -> float:
    """The epsilon of the blocks' attention-output norm (its root mean square adds it), 0 without one."""
    if not model.arch.head_norm:
        return 0.0
    norm = model.arch.get(model.arch.layer_modules(model.hf)[0], model.arch.head_norm)
    for name in ("eps", "variance_epsilon", "epsilon"):
        if isinstance(getattr(norm, name, None), (int, float)):
            return float(getattr(norm, name))
    raise UnsupportedArchitectureError(f"{model.arch.family}: the epsilon of '{model.arch.head_norm}' is unknown, "
                                       "so a head's share of its output cannot be computed")


_STOP_IDS: dict[tuple[int, str], list[int]] = {}

#: Where :func:`generate` writes θ: the prompt's last token only (Hypothesis), or every generated one too.
PATCH_MODES = ("prompt", "every")


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
             layer: int | None = None, stop: str = "\n", batch_size: int = 64, phase: str = "generate",
             patch: str = "prompt") -> list[list[int]]:
    """Greedy continuation of each text: at most ``max_new_tokens`` token ids, ending with the first
    token that contains ``stop`` (kept, so a merged token's text is not lost) or at the limit.

    With ``vectors`` (n_texts, d_model) and ``layer``: θ written after ``layer``. ``patch="prompt"``
    (Hypothesis): at each text's last token, in the prompt's forward only; the patched position stays in
    the key/value cache, so every later token attends to it. ``patch="every"`` (a control): also at each
    generated token as it is fed back, so every position the answer is produced from holds θ after
    ``layer`` (and so no longer its own token's state there). Batches are left padded (positions from the
    attention mask), so a batch gives the answers of its texts run one by one.
    """
    n = len(texts)
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens!r}")
    if patch not in PATCH_MODES:
        raise ValueError(f"patch must be one of {', '.join(PATCH_MODES)}, got {patch!r}")
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
        payload = GeneratePayload(inputs=inputs, max_new_tokens=int(max_new_tokens), stop_ids=stop_ids, layer=layer,
                                  theta=theta, every=patch == "every" and theta is not None)
        units.append(_Unit(payload=payload, result_bytes=len(rows) * max_new_tokens * 8, sent_bytes=sent, traces=1,
                           rows=len(rows), tokens=int(enc["attention_mask"].sum()) + len(rows) * (max_new_tokens - 1),
                           heads=len(rows) * max_new_tokens))
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
    the model does, NDIF included. ``vectors``: (n, d_model). What the model's forward does to the
    unembedding's output (Gemma 2's soft cap, Cohere's or Granite's scale) is done here too
    (:meth:`taskvec.arch.Arch.finish_logits`).
    """
    if vectors.dim() != 2 or vectors.shape[1] != model.d_model:
        raise ValueError(f"vectors must be (n, d_model={model.d_model}), got {tuple(vectors.shape)}")
    theta = _placed(model, vectors)
    enc = encode(model, [model.tokenizer.decode([model.tokenizer.pad_token_id])])
    unit = _Unit(payload=VocabPayload(inputs=enc, vectors=theta), result_bytes=_value_bytes(model, True) * len(theta),
                 sent_bytes=_sent_bytes(enc, theta), traces=1, rows=1, tokens=1, heads=len(theta))
    logits = _requests(model, "vocab", [unit], _vocab_session)[0].cpu()
    return model.arch.finish_logits(logits)
