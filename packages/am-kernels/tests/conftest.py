"""Shared fixtures: tiny models from configs, a pure-torch LigerOps, and a patch-leak guard."""

from __future__ import annotations

import importlib
import types
from typing import Any

import pytest
import torch
import transformers

from am_kernels import LIGER_PLANS, LigerOps, get_patch_report

torch.set_num_threads(1)

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# model_type -> (config class, causal LM class, modeling module, extra config kwargs)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", "transformers.models.llama.modeling_llama", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", "transformers.models.mistral.modeling_mistral", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", "transformers.models.qwen2.modeling_qwen2", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", "transformers.models.qwen3.modeling_qwen3", {"head_dim": 8}),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        "transformers.models.gemma3.modeling_gemma3",
        {"head_dim": 8, "sliding_window": 16, "final_logit_softcapping": 30.0},
    ),
}


def build_tiny(model_type: str, *, attn: str = "sdpa", seed: int = 0, **overrides):
    config_cls, model_cls, _, extra = ARCHS[model_type]
    config = getattr(transformers, config_cls)(**{**TINY, **extra, **overrides})
    config._attn_implementation = attn
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config)
    # Random norm weights so offset/casting mistakes in the glue change the numbers.
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0.0, 0.3)
    return model.eval()


def instance_state(model: Any) -> dict[str, dict[str, Any]]:
    """Every module's own __dict__ (shallow): identity-comparable snapshot of instance patches."""
    return {path: dict(vars(module)) for path, module in model.named_modules()}


def assert_same_state(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    assert before.keys() == after.keys()
    for path in before:
        assert before[path].keys() == after[path].keys(), (path, before[path].keys() ^ after[path].keys())
        for key, value in before[path].items():
            assert after[path][key] is value, f"{path or '<root>'}.{key} changed"


@pytest.fixture
def kit():
    """Helpers for test modules (no sys.path import of a shared helper module across packages)."""
    return types.SimpleNamespace(
        instance_state=instance_state, assert_same_state=assert_same_state, TINY=TINY, build_tiny=build_tiny
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _rms_norm(x, weight, eps, offset=0.0, casting_mode="llama", in_place=True):
    dtype = x.dtype
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "gemma":
        return (normed * (offset + weight.float())).to(dtype)
    return (offset + weight) * normed.to(dtype)


def _rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    cos, sin = cos.unsqueeze(unsqueeze_dim), sin.unsqueeze(unsqueeze_dim)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _flce(
    hidden_states,
    lm_head_weight,
    labels,
    hidden_size,
    num_items_in_batch=None,
    ignore_index=-100,
    shift_labels=None,
    final_logit_softcapping=None,
    **kwargs,
):
    logits = (hidden_states.reshape(-1, hidden_size) @ lm_head_weight.t()).float()
    if final_logit_softcapping is not None:
        logits = torch.tanh(logits / final_logit_softcapping) * final_logit_softcapping
    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:]
    reduction = "sum" if num_items_in_batch is not None else "mean"
    loss = torch.nn.functional.cross_entropy(
        logits, shift_labels.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )
    return loss / num_items_in_batch if num_items_in_batch is not None else loss


def _ce(logits, target, ignore_index=-100, reduction="mean"):
    return torch.nn.functional.cross_entropy(
        logits.float(), target, ignore_index=ignore_index, reduction=reduction
    )


@pytest.fixture
def torch_ops() -> LigerOps:
    """Liger's op signatures computed in plain torch: checks our glue where Triton cannot run."""
    return LigerOps(
        rms_norm=_rms_norm,
        swiglu=lambda a, b: torch.nn.functional.silu(a) * b,
        geglu=lambda a, b: torch.nn.functional.gelu(a, approximate="tanh") * b,
        rotary_pos_emb=_rope,
        fused_linear_cross_entropy=_flce,
        cross_entropy=_ce,
        source="torch reference (tests)",
    )


@pytest.fixture
def tiny():
    """Factory for tiny models; fails the test if a model it built is still patched at the end."""
    built = []

    def make(model_type: str = "llama", **kwargs):
        model = build_tiny(model_type, **kwargs)
        built.append(model)
        return model

    yield make
    leaked = [get_patch_report(m).format() for m in built if get_patch_report(m)]
    assert not leaked, "test leaked patches:\n" + "\n".join(leaked)


def _global_snapshot() -> dict:
    snap = {
        "torch.F.sdpa": torch.nn.functional.scaled_dot_product_attention,
        "torch.F.cross_entropy": torch.nn.functional.cross_entropy,
    }
    for model_type, (_, _, module_name, _) in ARCHS.items():
        module = importlib.import_module(module_name)
        plan = LIGER_PLANS[model_type]
        snap[f"{module_name}.{plan.rope_function}"] = vars(module)[plan.rope_function]
        for cls_name in (plan.norm_class, plan.mlp_class, plan.attention_class, plan.causal_lm_class):
            cls = vars(module)[cls_name]
            snap[f"{module_name}.{cls_name}"] = cls
            for attr in ("forward", "_get_name", "extra_repr", "loss_function", "_loss_function"):
                snap[f"{cls_name}.{attr}"] = vars(cls).get(attr)
    return snap


@pytest.fixture(autouse=True)
def no_global_patch_leak():
    """Our patches are per instance: no modeling module, class or torch function may change."""
    before = _global_snapshot()
    yield
    after = _global_snapshot()
    changed = [key for key in before if before[key] is not after[key]]
    assert not changed, f"global state changed: {changed}"
