"""What Liger may replace, per `config.model_type`: plain data, no model module is imported.

A row names the transformers classes (by exact class name) whose instances are patched and
how. Class names are matched exactly against `type(module).__name__`, never as substrings and
never through subclasses, because a subclass may have changed the forward we replace. A kernel
the row cannot express exactly is listed in `unsupported` with the reason: it is left off by
default and refused (ValueError naming the model type and the reason) when asked for.
`REFUSED` names the model types liger-kernel patches that no row can express at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

#: The kernels a row can offer, by the `patch_liger_kernel` flag that asks for them.
KERNELS = ("rms_norm", "swiglu", "rope", "fused_linear_cross_entropy", "cross_entropy")


@dataclass(frozen=True)
class LigerPlan:
    """How Liger's kernels map onto one architecture's modules."""

    #: RMSNorm class and Liger's norm parameters (the epsilon attribute is found on the module itself).
    norm_class: str
    norm_offset: float
    norm_casting_mode: str
    norm_in_place: bool
    #: Gated MLP class and its kernel: "swiglu" (silu gate) or "geglu" (tanh-gelu gate).
    mlp_class: str
    mlp_kind: str
    #: Config field naming the MLP activation, and the values the kernel computes exactly.
    mlp_act_attr: str
    mlp_acts: tuple[str, ...]
    #: Attention class whose forward calls the module-level rotary function named here.
    attention_class: str
    rope_function: str
    #: The causal-LM head class whose forward gets the fused linear cross entropy path.
    causal_lm_class: str
    #: Config field with the logit soft-cap (None when the architecture has none).
    softcap_attr: str | None = None
    #: "gate_up_down" (gate_proj, up_proj, down_proj) or "fused_gate_up" (gate_up_proj chunked in two, down_proj).
    mlp_layout: str = "gate_up_down"
    #: True when the gated MLP class may be absent (MoE models: only dense layers and shared experts have one).
    mlp_optional: bool = False
    #: True when some attention layers apply no rotary embedding (NoPE layers): those modules are left alone.
    rope_optional: bool = False
    #: Attribute of the head holding the base model (None: the head's `base_model_prefix`).
    base_model_attr: str | None = None
    #: (kernel, reason) pairs for the kernels of KERNELS this row cannot express exactly.
    unsupported: tuple[tuple[str, str], ...] = ()

    def reason(self, kernel: str) -> str | None:
        """Why `kernel` is not exact for this architecture, or None when the row supports it."""
        return dict(self.unsupported).get(kernel)


_SWIGLU_ACTS = ("silu", "swish")
_GEGLU_ACTS = ("gelu_pytorch_tanh",)


def _llama_like(prefix: str, *, in_place: bool = True, **changes: object) -> LigerPlan:
    plan = LigerPlan(
        norm_class=f"{prefix}RMSNorm",
        norm_offset=0.0,
        norm_casting_mode="llama",
        norm_in_place=in_place,
        mlp_class=f"{prefix}MLP",
        mlp_kind="swiglu",
        mlp_act_attr="hidden_act",
        mlp_acts=_SWIGLU_ACTS,
        attention_class=f"{prefix}Attention",
        rope_function="apply_rotary_pos_emb",
        causal_lm_class=f"{prefix}ForCausalLM",
    )
    return dataclasses.replace(plan, **changes)  # type: ignore[arg-type]


def _gemma_like(prefix: str, *, in_place: bool, act_attr: str, softcap: str | None = None) -> LigerPlan:
    # (1 + weight) in fp32 ("gemma" casting, offset 1) and a tanh-GELU gate.
    return _llama_like(
        prefix,
        in_place=in_place,
        norm_offset=1.0,
        norm_casting_mode="gemma",
        mlp_kind="geglu",
        mlp_act_attr=act_attr,
        mlp_acts=_GEGLU_ACTS,
        softcap_attr=softcap,
    )


# `(weight * x).to(dtype)` with x in fp32: "gemma" casting (all fp32) with offset 0.
_FP32_WEIGHT = {"norm_casting_mode": "gemma", "in_place": False}
_FUSED_EXPERTS = "its experts are fused into one parameter tensor (no per-expert gate/up/down modules)"
_MLA_ROPE = "its attention (MLA) rotates only the decoupled q_pe/k_pe slices, with a rope function Liger does not replace"

LIGER_PLANS: dict[str, LigerPlan] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "ministral": _llama_like("Ministral"),
    "qwen2": _llama_like("Qwen2"),
    # Qwen3 also normalises q and k per head; in-place norm backward is kept off for those views.
    "qwen3": _llama_like("Qwen3", in_place=False),
    "qwen3_moe": _llama_like("Qwen3Moe", in_place=False, mlp_optional=True),
    "exaone4": _llama_like("Exaone4", in_place=False, rope_optional=True),
    "smollm3": _llama_like("SmolLM3", rope_optional=True),
    "hunyuan_v1_dense": _llama_like("HunYuanDenseV1", in_place=False),
    "hunyuan_v1_moe": _llama_like("HunYuanMoEV1", in_place=False, mlp_optional=True),
    "olmo2": _llama_like("Olmo2", **_FP32_WEIGHT),
    "olmo3": _llama_like("Olmo3", **_FP32_WEIGHT),
    "phi3": _llama_like("Phi3", mlp_layout="fused_gate_up"),
    "granite": _llama_like(
        "Granite",
        unsupported=(
            (
                "fused_linear_cross_entropy",
                "GraniteForCausalLM divides the logits by config.logits_scaling after lm_head, which the fused "
                "loss (it runs lm_head itself) does not",
            ),
        ),
    ),
    "glm4": _llama_like(
        "Glm4",
        in_place=False,
        mlp_layout="fused_gate_up",
        unsupported=(
            (
                "rope",
                "Glm4's apply_rotary_pos_emb rotates interleaved pairs of a partial rotary dimension; Liger's rope "
                "rotates the two halves of the whole head",
            ),
        ),
    ),
    "mixtral": _llama_like("Mixtral", unsupported=(("swiglu", _FUSED_EXPERTS),)),
    "deepseek_v2": _llama_like(
        "DeepseekV2", in_place=False, mlp_optional=True, unsupported=(("rope", _MLA_ROPE),)
    ),
    "deepseek_v3": _llama_like(
        "DeepseekV3", in_place=False, mlp_optional=True, unsupported=(("rope", _MLA_ROPE),)
    ),
    "llama4_text": _llama_like(
        "Llama4Text",
        in_place=False,
        causal_lm_class="Llama4ForCausalLM",
        base_model_attr="model",  # its base_model_prefix names the VLM's attribute, language_model
        unsupported=(
            ("rope", "Llama4 rotates with complex-valued frequencies (apply_rotary_emb), not cos/sin tables"),
        ),
    ),
    "gpt_oss": _llama_like(
        "GptOss",
        **_FP32_WEIGHT,
        unsupported=(
            ("swiglu", "GptOssMLP routes to fused experts computing a clamped SwiGLU variant with biases"),
            ("rope", "GPT-OSS's rope takes half-width cos/sin tables, Liger's takes full-width ones"),
        ),
    ),
    "nemotron": _llama_like(
        "Nemotron",
        unsupported=(
            ("rms_norm", "NemotronLayerNorm1P is a mean-centred LayerNorm with a bias, not an RMSNorm"),
            ("swiglu", "NemotronMLP is an ungated relu2 MLP (up_proj, down_proj), not a gated one"),
        ),
    ),
    # Hybrid decoders (linear-attention layers have no attention module); norms scale by (1 + weight) in fp32.
    **{
        model_type: _llama_like(
            prefix,
            in_place=False,
            norm_offset=1.0,
            norm_casting_mode="gemma",
            mlp_optional=True,
            causal_lm_class=f"{prefix}ForCausalLM",
        )
        for model_type, prefix in (
            ("qwen3_next", "Qwen3Next"),
            ("qwen3_5_text", "Qwen3_5"),
            ("qwen3_5_moe_text", "Qwen3_5Moe"),
        )
    },
    "gemma": _gemma_like("Gemma", in_place=True, act_attr="hidden_act"),
    "gemma2": _gemma_like(
        "Gemma2", in_place=False, act_attr="hidden_activation", softcap="final_logit_softcapping"
    ),
    "gemma3_text": _gemma_like(
        "Gemma3", in_place=False, act_attr="hidden_activation", softcap="final_logit_softcapping"
    ),
}

_UNCHECKED = "no plan row yet: its layout has not been checked against one, so nothing is patched"
_VLM = "a vision-language model whose text model has no plan row yet (its layout is not checked against one)"

#: Model types liger-kernel patches (its MODEL_TYPE_TO_APPLY_LIGER_FN) that no plan row expresses exactly.
REFUSED: dict[str, str] = {
    "falcon_h1": (
        "a hybrid Mamba/attention decoder whose MLP and attention scale by muP multipliers "
        "(mlp_multipliers, key_multiplier) and whose logits by lm_head_multiplier"
    ),
    "deepseek_v4": _UNCHECKED,
    "gemma4_text": "its layers mix per-layer head dims and embeddings (per_layer_config) that one plan row cannot name",
    "gemma4": "its text model (gemma4_text) has per-layer head dims and embeddings that one plan row cannot name",
    "mllama_text_model": "its decoder interleaves cross-attention layers (MllamaTextCrossAttention) with its own layers",
    "muse_glimmer": _VLM,
    "muse_glimmer_text": _UNCHECKED,
    **{
        model_type: _VLM
        for model_type in (
            "glm4v",
            "glm4v_moe",
            "mllama",
            "pixtral",
            "qwen2_vl",
            "qwen2_vl_text",
            "qwen2_5_vl",
            "qwen2_5_vl_text",
            "qwen3_vl",
            "qwen3_vl_text",
            "qwen3_vl_moe",
            "qwen3_vl_moe_text",
        )
    },
}


def supported_model_types() -> list[str]:
    """Model types `patch_liger_kernel` accepts directly (VLMs are reached through `text_config`)."""
    return sorted(LIGER_PLANS)


__all__ = ["KERNELS", "LIGER_PLANS", "REFUSED", "LigerPlan", "supported_model_types"]
