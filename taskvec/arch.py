"""Where the residual stream, the final norm, the unembedding and the attention heads live, per model.

The task-vector method reads and writes one thing: the hidden state after decoder layer ``L`` at the
last token; it reads the vocabulary through the final norm and the unembedding; a study of attention
heads reads and writes each head's output before the attention output projection. Where these live
differs between model families (and the type a layer returns differs between transformers versions), so
exactly one place in the code knows it: the :class:`Arch` that :func:`resolve` finds for a model.

:func:`resolve` takes an explicit entry of :data:`LAYOUTS` where a family's layout differs from the
usual one, and otherwise finds the parts by structure (the one ``ModuleList`` of ``num_hidden_layers``
blocks, the norm beside it, ``get_output_embeddings()``, the attention module of a block and its output
projection). A family whose state is not a key/value cache, an encoder stack or an encoder-decoder is
declined with its reason (:data:`DECLINED`, :func:`check_family`). :func:`check_parts` then checks on the
loaded model, with one short forward pass, that the parts are what they are taken for: the blocks' outputs
carry the residual stream into the norm, the norm feeds the unembedding, the model's logits are the
unembedding's output after the transformation :class:`Arch` knows of, and the cache holds only keys and
values. A layout it cannot place is a clear error, never a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .compat import is_key_value_cache
from .errors import TaskvecError


class UnsupportedArchitectureError(TaskvecError, ValueError):
    """The model's family is declined, or its layout cannot be placed or fails validation."""


# --- families declined, with the reason -----------------------------------------------------------

_RECURRENT = ("its state is not only a key/value cache (recurrent, state-space or linear-attention layers); "
              "taskvec's cached path copies and reuses key/value caches and does not support that state yet")
_ENCODER = ("an encoder stack (BERT-style, bidirectional blocks used as a decoder) with no final norm before "
            "the unembedding; the method is defined for decoder-only causal LMs")
_ENCODER_DECODER = "an encoder-decoder; the method reads a decoder-only model's residual stream"

#: model_type -> why taskvec declines it. Encoder-decoders are declined from their config
#: (``is_encoder_decoder``) as well, whether listed or not.
DECLINED: dict[str, str] = {
    **{name: _RECURRENT for name in (
        "mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "jamba", "zamba", "zamba2", "falcon_h1", "bamba",
        "granitemoehybrid", "lfm2", "lfm2_moe", "lfm3", "nemotron_h", "recurrent_gemma", "qwen3_next", "qwen3_5",
        "qwen3_5_text", "qwen3_5_moe", "qwen3_5_moe_text", "qwen4_exp", "qwen4_exp_text", "kimi_linear",
        "bailing_hybrid", "minimax", "olmo_hybrid", "dots3_note", "dots3_note_text", "zaya", "axk2")},
    **{name: "keeps several residual streams per token (hyper-connections); the method reads and writes one"
       for name in ("deepseek_v4", "hy_v4")},
    **{name: "scales the final norm's output before the unembedding, a step the vocabulary read-out would skip"
       for name in ("inkling_text", "minicpm3")},
    "inkling2_text": "runs a step between the last block and the final norm, so no block's output is the stream read out",
    "modernbert-decoder": "a prediction head (dense, activation, norm) runs between the final norm and the unembedding",
    **{name: _ENCODER for name in (
        "bert", "bert-generation", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert",
        "rembert", "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl",
        "xmod", "xlm", "reformer", "xlnet")},
    **{name: _ENCODER_DECODER for name in (
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "marian", "mbart", "mvp", "pegasus", "plbart",
        "prophetnet", "whisper")},
    "openai-gpt": "post-norm blocks with no final norm before the unembedding (GPT-1)",
    "musicgen": "predicts several audio codebooks per position (one logit row per codebook), not one next token",
    "musicgen_melody": "predicts several audio codebooks per position (one logit row per codebook), not one next token",
    "moshi": "an audio model whose text stream depends on audio codebooks at every position",
    "hrm_text": "two recurrent stacks of blocks applied in cycles; no single residual stream after layer L",
    "git": "an image-to-text model whose decoder is a BERT-style encoder stack",
    "blt": "a byte-level model whose blocks run on patches, not on the tokens read and patched",
    "trocr": "a post-norm decoder built to cross-attend to an image encoder, with no final norm before the unembedding",
    "longcat_flash": "each block holds two attention and two MLP sublayers and counts as two layers, which no layout places",
    "mpt": "its generate recomputes the whole sequence at every step (no key/value cache), so θ written in the "
           "prompt's forward would not stay for the answer's later tokens",
    **{name: "its cache also keeps a sparse-attention indexer's keys, which the cached path does not copy"
       for name in ("deepseek_v32", "glm_moe_dsa")},
    "cpmant": "its blocks take a segment/position bias input and its cache is a list of tuples, not a Cache",
}


#: model_type -> why per-head access is unavailable for a family that is otherwise supported.
NO_HEADS: dict[str, str] = {
    "jetmoe": "its attention is a mixture of routed attention experts, so a layer has no fixed set of heads",
}


def check_family(config: Any) -> None:
    """Raise :class:`UnsupportedArchitectureError` for a declined family, from its config alone."""
    model_type = getattr(config, "model_type", None)
    if model_type in DECLINED:
        raise UnsupportedArchitectureError(f"architecture {model_type!r} is not supported: {DECLINED[model_type]}")
    if getattr(config, "is_encoder_decoder", False):
        raise UnsupportedArchitectureError(f"architecture {model_type!r} is not supported: {_ENCODER_DECODER}")


# --- layouts --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Attribute paths of the parts the method uses: ``layers``, ``final_norm`` and ``unembed`` from the
    causal-LM module, ``attention`` from a decoder block, ``head_out`` (the output projection, whose input
    is the heads' outputs side by side) from the attention module."""

    layers: str
    final_norm: str
    unembed: str
    attention: str
    head_out: str


_GPT2 = dict(layers="transformer.h", final_norm="transformer.ln_f", unembed="lm_head")

#: model_type -> its layout, where it differs from ``model.layers`` / ``model.norm`` / ``lm_head`` /
#: ``self_attn.o_proj`` (structure alone finds these too, but an entry pins them).
LAYOUTS: dict[str, Layout] = {
    "gpt2": Layout(**_GPT2, attention="attn", head_out="c_proj"),
    "gpt-sw3": Layout(**_GPT2, attention="attn", head_out="c_proj"),
    "gpt_bigcode": Layout(**_GPT2, attention="attn", head_out="c_proj"),
    "gptj": Layout(**_GPT2, attention="attn", head_out="out_proj"),
    "codegen": Layout(**_GPT2, attention="attn", head_out="out_proj"),
    "gpt_neo": Layout(**_GPT2, attention="attn.attention", head_out="out_proj"),
    "falcon": Layout(**_GPT2, attention="self_attention", head_out="dense"),
    "bloom": Layout(**_GPT2, attention="self_attention", head_out="dense"),
    "ctrl": Layout(layers="transformer.h", final_norm="transformer.layernorm", unembed="lm_head",
                   attention="multi_head_attention", head_out="dense"),
    "dbrx": Layout(layers="transformer.blocks", final_norm="transformer.norm_f", unembed="lm_head",
                   attention="norm_attn_norm.attn", head_out="out_proj"),
    "mpt": Layout(layers="transformer.blocks", final_norm="transformer.norm_f", unembed="lm_head",
                  attention="attn", head_out="out_proj"),
    # transformers >= 5 names Pythia's unembedding lm_head (embed_out before).
    "gpt_neox": Layout(layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", unembed="lm_head",
                       attention="attention", head_out="dense"),
    "gpt_neox_japanese": Layout(layers="gpt_neox_japanese.layers", final_norm="gpt_neox_japanese.final_layer_norm",
                                unembed="embed_out", attention="attention", head_out="dense"),
    "opt": Layout(layers="model.decoder.layers", final_norm="model.decoder.final_layer_norm", unembed="lm_head",
                  attention="self_attn", head_out="out_proj"),
    "phi": Layout(layers="model.layers", final_norm="model.final_layernorm", unembed="lm_head",
                  attention="self_attn", head_out="dense"),
    "persimmon": Layout(layers="model.layers", final_norm="model.final_layernorm", unembed="lm_head",
                        attention="self_attn", head_out="dense"),
}

#: Multimodal model types whose text decoder (one of the usual layout) sits under ``model.language_model``.
WRAPPERS = ("gemma3", "gemma4", "gemma4_unified", "llama4", "mistral3", "got_ocr2", "fuyu", "emu3", "mllama")

_BLOCK_LISTS = ("layers", "h", "blocks", "layer")
_NORMS = ("norm", "final_layernorm", "final_layer_norm", "ln_f", "norm_f", "final_norm", "layernorm", "layer_norm")
_ATTENTIONS = ("self_attn", "attn", "attention", "self_attention", "multi_head_attention", "mixer")
_HEAD_OUTS = ("o_proj", "out_proj", "dense", "c_proj", "wo", "o")


def _get(root: Any, path: str) -> Any:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _text_config(config: Any) -> Any:
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _n_heads(config: Any) -> int | None:
    text = _text_config(config)
    for key in ("num_attention_heads", "n_head", "num_heads", "n_heads"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _in_features(proj: torch.nn.Module) -> int | None:
    """Width of a projection's input: a ``Linear``'s ``in_features``, or a GPT-2 ``Conv1D``'s ``nx``."""
    if isinstance(proj, torch.nn.Linear):
        return proj.in_features
    if hasattr(proj, "nx"):
        return int(proj.nx)
    weight = getattr(proj, "weight", None)
    return int(weight.shape[1]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


@dataclass(frozen=True)
class Arch:
    """The parts one model's method runs on: attribute paths (dotted, from the causal-LM module), each
    layer's attention-head shape, and what the forward does to the unembedding's output."""

    family: str  #: config.model_type
    layers: str  #: the ModuleList of decoder blocks
    final_norm: str  #: the norm applied before the unembedding
    unembed: str  #: the Linear from d_model to the vocabulary
    d_model: int = 0  #: the residual stream's width (the unembedding's input)
    vocab_size: int = 0  #: the unembedding's output width
    attention: str | None = None  #: the attention module, from a block (None: per-head access unavailable)
    head_out: str | None = None  #: its output projection, from the attention module
    heads: tuple[tuple[int, int], ...] = ()  #: per layer (n_heads, head_dim) of the projection's input
    softcap: float | None = None  #: the forward's ``c * tanh(logits / c)`` after the unembedding, if any
    logit_scale: float = 1.0  #: the forward's multiplier of the unembedding's output
    #: the norm a block applies to its attention output before adding it to the residual stream (Gemma 2 to 4,
    #: OLMo 2 and 3, GLM 4, EXAONE 4, AFMoE, HyperCLOVA X: :func:`_find_head_norm`), from a block; None where the projected output
    #: joins the stream as it is
    head_norm: str | None = None

    def get(self, root: Any, path: str) -> Any:
        """Follow ``path`` from ``root`` (works on torch modules and nnsight envoys)."""
        return _get(root, path)

    def layer_modules(self, root: Any) -> Any:
        return self.get(root, self.layers)

    def n_layers(self, root: Any) -> int:
        return len(self.layer_modules(root))

    def head_module(self, root: Any, layer: int) -> Any:
        """The output projection of ``layer``'s attention, whose input holds the heads side by side."""
        self._require_heads()
        if self.attention is None or self.head_out is None:
            raise UnsupportedArchitectureError(
                f"family {self.family!r}: no attention output projection was found, so per-head access is unavailable")
        return self.get(self.layer_modules(root)[layer], f"{self.attention}.{self.head_out}")

    def head_shape(self, layer: int) -> tuple[int, int]:
        """(n_heads, head_dim) of ``layer``'s attention output projection input."""
        self._require_heads()
        if not self.heads:
            raise UnsupportedArchitectureError(
                f"family {self.family!r}: the heads' shape is unknown, so per-head access is unavailable")
        return self.heads[layer]

    def _require_heads(self) -> None:
        if self.family in NO_HEADS:
            raise UnsupportedArchitectureError(f"family {self.family!r} has no per-head access: {NO_HEADS[self.family]}")

    def finish_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's logits from the unembedding's output: its scale, then its soft cap (argmax unchanged)."""
        if self.logit_scale != 1.0:
            logits = logits * self.logit_scale
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def validate(self, model: torch.nn.Module) -> None:
        """Check every path exists on ``model``, so a layout change fails loudly at load time."""
        for role in ("layers", "final_norm", "unembed"):
            path = getattr(self, role)
            try:
                self.get(model, path)
            except AttributeError:
                raise UnsupportedArchitectureError(
                    f"{type(model).__name__}: expected the {role} at '{path}' for family {self.family!r}, "
                    "but it is not there (a transformers version with another module layout?)"
                ) from None
        if not isinstance(self.layer_modules(model), torch.nn.ModuleList):
            raise UnsupportedArchitectureError(f"{type(model).__name__}: '{self.layers}' is not a ModuleList of blocks")


def _path_of(model: torch.nn.Module, target: torch.nn.Module) -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return name
    return None


def _find_layers(model: torch.nn.Module, n_layers: int | None, under: str = "") -> str:
    """The one ModuleList of ``n_layers`` decoder blocks (named like one) under ``under``, by structure."""
    found = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and name.rsplit(".", 1)[-1] in _BLOCK_LISTS
             and name.startswith(under)
             and (n_layers is None or len(module) == n_layers)]
    if len(found) != 1:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__}: cannot place the decoder blocks: expected one ModuleList named "
            f"{'/'.join(_BLOCK_LISTS)} with num_hidden_layers={n_layers} blocks, found {found or 'none'}")
    return found[0]


def _find_sibling(model: torch.nn.Module, parent: str, names: tuple[str, ...], what: str) -> str:
    owner = _get(model, parent) if parent else model
    for name in names:
        if isinstance(getattr(owner, name, None), torch.nn.Module):
            return f"{parent}.{name}" if parent else name
    raise UnsupportedArchitectureError(
        f"{type(model).__name__}: cannot place the {what}: none of {', '.join(names)} beside '{parent or 'the model'}'")


def _find_attention(block: torch.nn.Module) -> tuple[str, str] | tuple[None, None]:
    for attention in _ATTENTIONS:
        module = getattr(block, attention, None)
        if isinstance(module, torch.nn.Module):
            for head_out in _HEAD_OUTS:
                if isinstance(getattr(module, head_out, None), torch.nn.Module):
                    return attention, head_out
    return None, None


def _head_shapes(model: torch.nn.Module, layers: str, attention: str | None, head_out: str | None,
                 config: Any) -> tuple[tuple[int, int], ...]:
    n_heads = _n_heads(config)
    if attention is None or head_out is None or n_heads is None:
        return ()
    shapes = []
    for block in _get(model, layers):
        try:
            width = _in_features(_get(block, f"{attention}.{head_out}"))
        except AttributeError:
            return ()
        if width is None or width % n_heads:
            return ()
        shapes.append((n_heads, width // n_heads))
    return tuple(shapes)


def _logit_transform(config: Any) -> tuple[float | None, float]:
    """(soft cap, scale) the causal LM's forward applies to the unembedding's output, from its config."""
    text = _text_config(config)
    softcap = getattr(text, "final_logit_softcapping", None) or getattr(config, "final_logit_softcapping", None)
    scale = 1.0
    if getattr(text, "logit_scale", None) is not None:  # Cohere
        scale = float(text.logit_scale)
    if getattr(text, "logits_scaling", None) and text.model_type.startswith("granite"):  # Granite divides
        scale = 1.0 / float(text.logits_scaling)
    return (float(softcap) if softcap else None), scale


def resolve(model: torch.nn.Module, config: Any | None = None) -> Arch:
    """The :class:`Arch` of a transformers causal LM (weights real or on the meta device).

    Raises :class:`UnsupportedArchitectureError` for a declined family or a layout it cannot place.
    """
    config = config if config is not None else model.config
    check_family(config)
    model_type = getattr(config, "model_type", None)
    layout = LAYOUTS.get(model_type)
    if layout is not None:
        layers, final_norm, unembed = layout.layers, layout.final_norm, layout.unembed
        attention, head_out = layout.attention, layout.head_out
    else:
        text = _text_config(config)
        under = "model.language_model." if model_type in WRAPPERS else ""
        layers = _find_layers(model, getattr(text, "num_hidden_layers", None), under)
        parent = layers.rsplit(".", 1)[0] if "." in layers else ""
        final_norm = _find_sibling(model, parent, _NORMS, "final norm")
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        unembed = _path_of(model, output) if isinstance(output, torch.nn.Module) else None
        if unembed is None:
            raise UnsupportedArchitectureError(f"{type(model).__name__}: cannot place the unembedding "
                                               "(get_output_embeddings() gives no module)")
        attention, head_out = _find_attention(_get(model, layers)[0])
    Arch(family=str(model_type), layers=layers, final_norm=final_norm, unembed=unembed).validate(model)
    softcap, scale = _logit_transform(config)
    try:
        d_model, vocab_size = _in_features(_get(model, unembed)), getattr(_get(model, unembed), "out_features", None)
    except AttributeError:
        d_model = vocab_size = None
    if not d_model or not vocab_size:
        raise UnsupportedArchitectureError(f"{type(model).__name__}: the unembedding at '{unembed}' is not a Linear "
                                           "from the residual stream to the vocabulary")
    arch = Arch(family=str(model_type), layers=layers, final_norm=final_norm, unembed=unembed, d_model=d_model,
                vocab_size=int(vocab_size), attention=attention,
                head_out=head_out, heads=_head_shapes(model, layers, attention, head_out, config),
                softcap=softcap, logit_scale=scale,
                head_norm=_find_head_norm(_get(model, layers)[0]) if attention else None)
    return arch


#: Names of a norm that only the attention output goes through (a "sandwich" or post-norm block).
_HEAD_NORMS = ("post_self_attn_layernorm", "post_norm1")


def _find_head_norm(block: torch.nn.Module) -> str | None:
    """The path, from a decoder block, of the norm its attention output goes through before the residual
    stream, or None. ``post_attention_layernorm`` is that norm only in blocks that normalise the MLP's input
    elsewhere (``pre_feedforward_layernorm``, ``pre_mlp_layernorm``) or have no input norm (OLMo 2's post-norm order); in a
    pre-norm block (Llama) the same name is the MLP's input norm. :func:`check_parts` checks the choice on
    the loaded model: the norm must take the attention projection's output, and nothing else may."""
    names = {name for name, _ in block.named_children()}
    for name in _HEAD_NORMS:
        if name in names:
            return name
    if "post_attention_layernorm" in names and (
            names & {"pre_feedforward_layernorm", "pre_mlp_layernorm"} or ("post_feedforward_layernorm" in names
                                                     and "input_layernorm" not in names)):
        return "post_attention_layernorm"
    return None


def skeleton(config: Any) -> torch.nn.Module:
    """The causal LM of ``config`` on the meta device: its module tree, no weights allocated."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def arch_for(config: Any) -> Arch:
    """The :class:`Arch` for a transformers config, found on a weightless skeleton of the model, so an
    unsupported family or layout fails before any weights load."""
    check_family(config)
    try:
        model = skeleton(config)
    except UnsupportedArchitectureError:
        raise
    except Exception as error:  # noqa: BLE001 - transformers cannot build it: say so, with its reason
        raise UnsupportedArchitectureError(
            f"architecture {getattr(config, 'model_type', None)!r}: transformers cannot build it from its config "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})") from None
    return resolve(model, config)


# --- validation on the loaded model -----------------------------------------------------------------

@torch.no_grad()
def check_parts(model: torch.nn.Module, arch: Arch, input_ids: torch.Tensor) -> None:
    """Run ``input_ids`` (1, seq) once and check the parts are what ``arch`` takes them for (see the module
    docstring); raises :class:`UnsupportedArchitectureError` naming what does not hold."""
    name = f"{type(model).__name__} ({arch.family})"
    blocks = arch.layer_modules(model)
    seen: dict[str, Any] = {}
    hooks = [
        blocks[-1].register_forward_hook(lambda m, a, out: seen.__setitem__("last", out)),
        arch.get(model, arch.final_norm).register_forward_hook(
            lambda m, args, out: seen.update(norm_in=args[0] if args else None, norm_out=out)),
        arch.get(model, arch.unembed).register_forward_hook(
            lambda m, args, out: seen.update(unembed_in=args[0] if args else None, unembed_out=out)),
    ]
    if arch.heads:
        hooks.append(arch.head_module(model, 0).register_forward_pre_hook(
            lambda m, args: seen.__setitem__("heads_in", args[0] if args else None)))
        hooks.append(arch.head_module(model, 0).register_forward_hook(
            lambda m, args, out: seen.__setitem__("heads_out", out)))
        takers = seen.setdefault("takers", [])
        projection = arch.head_module(model, 0)
        for path, module in blocks[0].named_modules():
            if module is projection or not path or isinstance(module, (torch.nn.Dropout, torch.nn.Identity)):
                continue
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, path=path: takers.append(path) if args and isinstance(args[0], torch.Tensor)
                and args[0] is seen.get("heads_out") else None))
    try:
        out = model(input_ids=input_ids, use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    try:
        hidden = residual(seen.get("last"))
    except TypeError as error:
        raise UnsupportedArchitectureError(f"{name}: the blocks at '{arch.layers}' do not return the residual "
                                           f"stream ({error})") from None

    def same(a: Any, b: Any) -> bool:
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.allclose(
            a.float(), b.float(), atol=1e-4, rtol=1e-4)

    if not same(seen.get("norm_in"), hidden):
        raise UnsupportedArchitectureError(f"{name}: the norm at '{arch.final_norm}' does not take the last block's "
                                           "output (something runs between them)")
    if not same(seen.get("unembed_in"), seen.get("norm_out")):
        raise UnsupportedArchitectureError(f"{name}: the unembedding at '{arch.unembed}' does not take the final "
                                           "norm's output (the forward transforms it in between)")
    logits = getattr(out, "logits", None)
    unembedded = seen.get("unembed_out")
    if not (isinstance(logits, torch.Tensor) and isinstance(unembedded, torch.Tensor)
            and logits.shape[-1] == unembedded.shape[-1]
            and torch.allclose(arch.finish_logits(unembedded[:, -1].float()), logits[:, -1].float(), atol=1e-3,
                               rtol=1e-3)):
        raise UnsupportedArchitectureError(f"{name}: the model's logits are not the unembedding's output after the "
                                           "transformations taskvec knows (scale, soft cap)")
    if not is_key_value_cache(getattr(out, "past_key_values", None)):
        raise UnsupportedArchitectureError(f"{name}: {_RECURRENT}")
    if arch.heads:
        heads_in = seen.get("heads_in")
        n_heads, head_dim = arch.heads[0]
        if not (isinstance(heads_in, torch.Tensor) and heads_in.dim() == 3 and heads_in.shape[-1] == n_heads * head_dim):
            raise UnsupportedArchitectureError(f"{name}: the input of '{arch.attention}.{arch.head_out}' is not the "
                                               f"{n_heads} heads side by side")
        takers = [t for t in seen.get("takers", []) if not t.startswith(f"{arch.attention}.")]
        if takers != ([arch.head_norm] if arch.head_norm else []):
            raise UnsupportedArchitectureError(
                f"{name}: the attention output goes through {', '.join(takers) or 'nothing'} before the residual "
                f"stream, where taskvec expects {arch.head_norm or 'nothing'}, so a head's share of the stream "
                "would be wrong")


def residual(layer_output: Any) -> torch.Tensor:
    """The residual-stream tensor (batch, seq, d_model) inside a decoder layer's output.

    transformers >= 5 returns a tensor from most decoder layers; older versions and
    some families return a tuple whose first item is the hidden state. Anything
    else is an error rather than a silent mismatch.
    """
    if isinstance(layer_output, torch.Tensor):
        hidden = layer_output
    elif isinstance(layer_output, (tuple, list)) and layer_output and isinstance(layer_output[0], torch.Tensor):
        hidden = layer_output[0]
    else:
        raise TypeError(f"unexpected decoder-layer output type {type(layer_output).__name__}")
    if hidden.dim() != 3:
        raise TypeError(f"decoder-layer hidden state has shape {tuple(hidden.shape)}, expected 3 dims")
    return hidden


__all__ = ["Arch", "DECLINED", "LAYOUTS", "Layout", "NO_HEADS", "UnsupportedArchitectureError", "arch_for", "check_family",
           "check_parts", "resolve", "residual", "skeleton"]
