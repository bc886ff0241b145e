"""Plain PyTorch references for the golden tests: one unpadded prompt at a time, forward hooks, no nnsight,
no key/value cache reuse. What taskvec computes through nnsight must equal these."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from taskvec.arch import residual


def _ids(model, text: str) -> torch.Tensor:
    return model.tokenizer(text, return_tensors="pt").input_ids


def plain_logits(model, text: str) -> torch.Tensor:
    """The model's own last-position logits for ``text`` alone."""
    with torch.no_grad():
        return model.hf(input_ids=_ids(model, text)).logits[0, -1]


def plain_last_hidden(model, text: str) -> torch.Tensor:
    """(n_layers, d_model): each layer's output at the last token, via forward hooks, one unpadded prompt."""
    captured = {}
    hooks = [
        layer.register_forward_hook(lambda mod, args, out, i=i: captured.__setitem__(i, residual(out)[0, -1].clone()))
        for i, layer in enumerate(model.arch.layer_modules(model.hf))
    ]
    try:
        plain_logits(model, text)
    finally:
        for hook in hooks:
            hook.remove()
    return torch.stack([captured[i] for i in range(len(captured))])


def plain_patched_logits(model, text: str, layer: int, vector: torch.Tensor) -> torch.Tensor:
    """Last-position logits with the last token's output of ``layer`` replaced by ``vector`` (a plain hook)."""

    def replace(mod, args, out):
        hidden = residual(out).clone()
        hidden[:, -1] = vector
        return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])

    hook = model.arch.layer_modules(model.hf)[layer].register_forward_hook(replace)
    try:
        return plain_logits(model, text)
    finally:
        hook.remove()


def plain_heads(model, text: str, layer: int) -> torch.Tensor:
    """(n_heads, head_dim): the input of ``layer``'s attention output projection at the last token, split."""
    n_heads, head_dim = model.arch.head_shape(layer)
    seen = {}
    hook = model.arch.head_module(model.hf, layer).register_forward_pre_hook(
        lambda mod, args: seen.__setitem__("x", args[0][0, -1].clone()))
    try:
        plain_logits(model, text)
    finally:
        hook.remove()
    return seen["x"].reshape(n_heads, head_dim)


@contextmanager
def heads_set(model, layer: int, heads, values: torch.Tensor):
    """Within: ``heads`` of ``layer`` at the last token set to ``values`` (len(heads), head_dim) in the input of
    the attention output projection (a plain pre-hook)."""
    _, head_dim = model.arch.head_shape(layer)

    def replace(mod, args):
        x = args[0].clone()
        for j, head in enumerate(heads):
            x[:, -1, head * head_dim:(head + 1) * head_dim] = values[j]
        return (x, *args[1:])

    hook = model.arch.head_module(model.hf, layer).register_forward_pre_hook(replace)
    try:
        yield
    finally:
        hook.remove()


def plain_head_patched_logits(model, text: str, layer: int, heads, values: torch.Tensor) -> torch.Tensor:
    """Last-position logits with ``heads`` of ``layer`` at the last token set to ``values`` (:func:`heads_set`)."""
    with heads_set(model, layer, heads, values):
        return plain_logits(model, text)


def plain_generate(model, text: str, steps: int, layer: int | None = None, vector: torch.Tensor | None = None,
                   stop_ids=(), every: bool = False) -> list[int]:
    """Greedy decoding without a cache: the whole sequence runs again at every step; with ``vector``, a forward
    hook overwrites the output of ``layer`` at the prompt's last position (every step, as the cache keeps it),
    and with ``every`` at each generated position after it too."""
    ids = _ids(model, text)
    position = ids.shape[1] - 1
    hook = None
    if vector is not None:
        def replace(mod, args, out):
            hidden = residual(out).clone()
            if every:
                hidden[:, position:] = vector
            else:
                hidden[:, position] = vector
            return hidden if isinstance(out, torch.Tensor) else (hidden, *out[1:])
        hook = model.arch.layer_modules(model.hf)[layer].register_forward_hook(replace)
    out = []
    try:
        for _ in range(steps):
            with torch.no_grad():
                token = int(model.hf(input_ids=ids).logits[0, -1].argmax())
            out.append(token)
            if token in stop_ids:
                break
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    finally:
        if hook is not None:
            hook.remove()
    return out


def plain_attention_share(model, text: str, layer: int) -> torch.Tensor:
    """(d_model,): what ``layer``'s attention adds to the residual stream at the last token: the output
    projection's output, through the block's attention-output norm where it has one (``arch.head_norm``)."""
    seen = {}
    block = model.arch.layer_modules(model.hf)[layer]
    module = model.arch.get(block, model.arch.head_norm) if model.arch.head_norm else model.arch.head_module(model.hf, layer)
    hook = module.register_forward_hook(lambda mod, args, out: seen.__setitem__("x", out[0, -1].clone()))
    try:
        plain_logits(model, text)
    finally:
        hook.remove()
    return seen["x"]


def plain_last_hidden_with_heads(model, text: str, layer: int, heads, values: torch.Tensor) -> torch.Tensor:
    """(n_layers, d_model) as :func:`plain_last_hidden`, with ``heads`` of ``layer`` set (:func:`heads_set`)."""
    with heads_set(model, layer, heads, values):
        return plain_last_hidden(model, text)
