"""Where the residual stream, the final norm and the unembedding live, per architecture.

The task-vector method reads and writes one thing: the hidden state after decoder
layer ``L`` at the last token. Its location differs between model families (and the
type a layer returns differs between transformers versions), so exactly one place
in the code knows it: :class:`Arch`. An architecture that is not listed is an error,
never a silent no-op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .errors import TaskvecError


class UnsupportedArchitectureError(TaskvecError, ValueError):
    """The model's family has no entry in :data:`ARCHITECTURES`."""


@dataclass(frozen=True)
class Arch:
    """Attribute paths (dotted, from the causal-LM module) of the parts the method uses."""

    family: str
    layers: str  # the ModuleList of decoder blocks
    final_norm: str  # the norm applied before the unembedding
    unembed: str  # the Linear from d_model to the vocabulary

    def get(self, root: Any, path: str) -> Any:
        """Follow ``path`` from ``root`` (works on torch modules and nnsight envoys)."""
        obj = root
        for part in path.split("."):
            obj = getattr(obj, part)
        return obj

    def layer_modules(self, root: Any) -> Any:
        return self.get(root, self.layers)

    def n_layers(self, root: Any) -> int:
        return len(self.layer_modules(root))

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


_DECODER = dict(layers="model.layers", final_norm="model.norm", unembed="lm_head")
_GPT2 = dict(layers="transformer.h", final_norm="transformer.ln_f", unembed="lm_head")

#: config.model_type -> Arch. Llama-style decoders share one layout.
ARCHITECTURES: dict[str, Arch] = {
    # Text-only Gemma 3 (270M, 1B). The 4B+ checkpoints are multimodal (model_type "gemma3",
    # layers under model.language_model) and are not listed, so they fail before loading.
    "gemma3_text": Arch("gemma3", **_DECODER),
    "gemma2": Arch("gemma2", **_DECODER),
    "gemma": Arch("gemma", **_DECODER),
    "llama": Arch("llama", **_DECODER),
    "mistral": Arch("mistral", **_DECODER),
    "qwen2": Arch("qwen2", **_DECODER),
    "qwen3": Arch("qwen3", **_DECODER),
    # transformers >= 5 names Pythia's unembedding lm_head (embed_out before).
    "gpt_neox": Arch("gpt_neox", layers="gpt_neox.layers", final_norm="gpt_neox.final_layer_norm", unembed="lm_head"),
    "gptj": Arch("gptj", **_GPT2),
    "gpt2": Arch("gpt2", **_GPT2),
}


def arch_for(config: Any) -> Arch:
    """The :class:`Arch` for a transformers config; raises for unknown families."""
    model_type = getattr(config, "model_type", None)
    try:
        return ARCHITECTURES[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} is not supported; supported model_type values: "
            f"{', '.join(sorted(ARCHITECTURES))}. Add an Arch entry in taskvec/arch.py "
            "(and a golden test) to support it."
        ) from None


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
