"""Tiny random models of every causal-LM family the installed transformers lists, built in code.

``causal_lm_types()`` enumerates transformers' causal-LM model types, so a new release's families are
tried automatically. ``tiny_config(model_type)`` gives generic small sizes (2 layers, d_model 32, 4
heads of 8) with per-family changes where the generic ones do not fit; ``tiny_family_model`` builds the
model with seeded random weights, scaled so argmax answers are well separated. Nothing downloads.
"""

from __future__ import annotations

import torch

from conftest import VOCAB, random_causal_lm  # VOCAB: the character tokenizer's size

GENERIC = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, vocab_size=VOCAB, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
               eos_token_id=2, tie_word_embeddings=False)

#: A family whose config has a sliding window gets this one, shorter than the tests' prompts.
SLIDING_WINDOW = 8

_MLA = dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
            qk_head_dim=8, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, moe_intermediate_size=16,
            first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=4)

#: model_type -> changes to the generic sizes (merged over them; None removes a key).
PER_FAMILY: dict[str, dict] = {
    "gptj": dict(rotary_dim=4),
    "codegen": dict(rotary_dim=4),
    "falcon": dict(head_dim=None, new_decoder_architecture=True, num_kv_heads=2),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=8),
    "dots3_note": dict(num_key_value_heads=4),
    "dots3_note_text": dict(num_key_value_heads=4),
    "deepseek_v2": _MLA, "deepseek_v3": _MLA, "deepseek_v32": _MLA, "glm4_moe_lite": _MLA,
    "glm_moe_dsa": _MLA, "longcat_flash": _MLA, "minicpm3": _MLA, "youtu": _MLA, "axk1": _MLA, "axk2": _MLA,
    "gemma4_text": dict(vocab_size_per_layer_input=VOCAB, hidden_size_per_layer_input=8),
    "kolibri1": dict(moe_intermediate_size=16, num_local_experts=4, shared_expert_intermediate_size=16,
                     num_experts_per_tok=2),
    "mimo_v2_flash": dict(moe_intermediate_size=16, n_routed_experts=4, v_head_dim=8, num_experts_per_tok=2),
    "solar_open": dict(moe_intermediate_size=16, n_routed_experts=4, num_experts_per_tok=2),
    "dbrx": dict(d_model=32, n_heads=4, n_layers=2, attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0),
                 ffn_config=dict(ffn_hidden_size=64, moe_num_experts=4, moe_top_k=2)),
}


#: Multimodal types whose text decoder sits under ``model.language_model``: a tiny vision tower beside it.
TINY_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                   patch_size=8)
WRAPPED = {"gemma3": dict(mm_tokens_per_image=4), "gemma4": dict(audio_config=None), "llama4": {}}
#: Changes to the text and vision configs of a wrapped type.
WRAPPED_TEXT = {"gemma4": PER_FAMILY["gemma4_text"], "llama4": dict(intermediate_size_mlp=64, num_local_experts=2)}
WRAPPED_VISION = {"llama4": dict(vision_output_dim=32, projector_input_dim=32, projector_output_dim=32)}


MAX_PARAMETERS = 30_000_000


def causal_lm_types() -> list[str]:
    """Every model type transformers maps to a causal-LM class, sorted."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    sizes = {**GENERIC, **PER_FAMILY.get(model_type, {})}
    sizes = {key: value for key, value in sizes.items() if value is not None}
    if isinstance(getattr(CONFIG_MAPPING[model_type](), "sliding_window", None), int):
        sizes.setdefault("sliding_window", SLIDING_WINDOW)  # shorter than the test prompts: windows are exercised
    if model_type in WRAPPED:
        text = {key: value for key, value in sizes.items() if not key.endswith("token_id")}
        text.update(WRAPPED_TEXT.get(model_type, {}))
        config = CONFIG_MAPPING[model_type](text_config=text, vision_config={**TINY_VISION, **WRAPPED_VISION.get(model_type, {})}, **WRAPPED[model_type])
    else:
        config = CONFIG_MAPPING[model_type](**sizes)
    for key in ("hidden_dropout", "attention_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
                "hidden_dropout_prob", "attention_probs_dropout_prob"):
        if isinstance(getattr(config, key, None), float):
            setattr(config, key, 0.0)
    return config


def tiny_family_model(model_type: str) -> torch.nn.Module:
    """A tiny random causal LM of ``model_type`` in float32, eval mode (raises if it cannot be built)."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.device("meta"):  # count first: parts the generic sizes do not reach (a vision tower) can be huge
        size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    if size > MAX_PARAMETERS:
        raise ValueError(f"{size:,} parameters with generic sizes (parts they do not reach stay full size)")
    return random_causal_lm(config)


_STATUS_TITLES = {
    "accepted": "Accepted and golden-tested",
    "failed": "Failed the golden test",
    "untested": "Not tested (no tiny model from generic sizes; taskvec tries its layout when loaded)",
    "declined": "Declined",
}


def readme_section(outcomes: dict[str, dict]) -> str:
    """The README's list of families from a run's outcomes (``build/families.json``)."""
    lines = []
    for status, title in _STATUS_TITLES.items():
        types = sorted(t for t, o in outcomes.items() if o["status"] == status)
        if not types:
            continue
        if status != "declined":
            lines += [f"**{title} ({len(types)}):** " + ", ".join(f"`{t}`" for t in types) + ".", ""]
            continue
        lines += [f"**{title} ({len(types)}),** by reason:", ""]
        reasons: dict[str, list[str]] = {}
        for t in types:
            reasons.setdefault(outcomes[t]["detail"], []).append(t)
        for reason, names in sorted(reasons.items(), key=lambda item: (-len(item[1]), item[0])):
            lines.append(f"- {reason[0].upper() + reason[1:]}: " + ", ".join(f"`{t}`" for t in names) + ".")
        lines.append("")
    return "\n".join(lines)
