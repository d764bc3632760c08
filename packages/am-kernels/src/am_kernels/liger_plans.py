"""What Liger may replace, per `config.model_type`: plain data, no model module is imported.

A row names the transformers classes (by exact class name) whose instances are patched and
how. Class names are matched exactly against `type(module).__name__`, never as substrings and
never through subclasses, because a subclass may have changed the forward we replace.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LigerPlan:
    """How Liger's kernels map onto one architecture's modules."""

    #: RMSNorm class, the attribute holding its epsilon, and Liger's norm parameters.
    norm_class: str
    norm_eps_attr: str
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


_SWIGLU_ACTS = ("silu", "swish")


def _llama_like(prefix: str, *, in_place: bool = True) -> LigerPlan:
    return LigerPlan(
        norm_class=f"{prefix}RMSNorm",
        norm_eps_attr="variance_epsilon",
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


LIGER_PLANS: dict[str, LigerPlan] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    # Qwen3 also normalises q and k per head; in-place norm backward is kept off for those views.
    "qwen3": _llama_like("Qwen3", in_place=False),
    # Gemma3 scales by (1 + weight) in fp32 ("gemma" casting, offset 1) and gates with tanh-GELU.
    "gemma3_text": LigerPlan(
        norm_class="Gemma3RMSNorm",
        norm_eps_attr="eps",
        norm_offset=1.0,
        norm_casting_mode="gemma",
        norm_in_place=False,
        mlp_class="Gemma3MLP",
        mlp_kind="geglu",
        mlp_act_attr="hidden_activation",
        mlp_acts=("gelu_pytorch_tanh",),
        attention_class="Gemma3Attention",
        rope_function="apply_rotary_pos_emb",
        causal_lm_class="Gemma3ForCausalLM",
        softcap_attr="final_logit_softcapping",
    ),
}


def supported_model_types() -> list[str]:
    """Model types `patch_liger_kernel` accepts directly (VLMs are reached through `text_config`)."""
    return sorted(LIGER_PLANS)


__all__ = ["LIGER_PLANS", "LigerPlan", "supported_model_types"]
