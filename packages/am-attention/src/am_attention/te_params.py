"""Read attention hyper-parameters off a Hugging Face attention module, without running it."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

__all__ = ["AttnParams", "check_attention_module", "infer_attn_params", "proj_out_features"]


@dataclass(frozen=True)
class AttnParams:
    """What a DotProductAttention kernel needs; `window_size` is TE's `(left, right)` ((-1, 0) = full causal)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    window_size: tuple[int, int]
    softmax_scale: float


def proj_out_features(proj: torch.nn.Module | None) -> int | None:
    """Output features of a projection: `out_features`, else `weight.shape[0]` (meta-safe), else a `.linear` child."""
    if proj is None:
        return None
    out = getattr(proj, "out_features", None)
    if isinstance(out, int):
        return out
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0])
    inner = getattr(proj, "linear", None)
    if isinstance(inner, torch.nn.Module) and inner is not proj:
        return proj_out_features(inner)
    return None


def _int_attr(obj: object, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _window(module: torch.nn.Module) -> tuple[int, int] | None:
    """TE window for the module's sliding window W: (W-1, 0); (-1, 0) when the layer attends to all keys.

    The module's own `sliding_window` attribute wins (Qwen2/Gemma3 set it per layer, None on full
    layers); without it the config's (Mistral reads `config.sliding_window` at call time).
    """
    if "sliding_window" in vars(module) or hasattr(type(module), "sliding_window"):
        window = module.sliding_window
    else:
        config = getattr(module, "config", None)
        window = getattr(config, "sliding_window", None)
        if getattr(config, "use_sliding_window", True) is False:
            window = None
    if window is None:
        return (-1, 0)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        return None
    return (window - 1, 0)


def check_attention_module(module: torch.nn.Module) -> tuple[AttnParams | None, str]:
    """`(params, "ok")` when TE can take `module`, else `(None, reason)`; pure."""
    q, k, v = (getattr(module, name, None) for name in ("q_proj", "k_proj", "v_proj"))
    if not all(isinstance(p, torch.nn.Module) for p in (q, k, v)):
        return None, "layout: no separate q_proj/k_proj/v_proj"
    q_out, k_out, v_out = proj_out_features(q), proj_out_features(k), proj_out_features(v)
    if q_out is None or k_out is None or v_out is None:
        return None, "layout: projection output size unknown"
    if k_out != v_out:
        return None, f"layout: k_proj ({k_out}) and v_proj ({v_out}) differ"
    config = getattr(module, "config", None)
    num_heads = _int_attr(module, "num_heads", "num_attention_heads")
    if num_heads is None:
        num_heads = _int_attr(config, "num_attention_heads")
    head_dim = _int_attr(module, "head_dim") or _int_attr(config, "head_dim")
    if head_dim is None and num_heads is not None and q_out % num_heads == 0:
        head_dim = q_out // num_heads
    if head_dim is None or q_out % head_dim or k_out % head_dim:
        return None, f"heads: cannot infer head_dim (q_proj {q_out}, k_proj {k_out})"
    # Projection shapes are the truth on TP-sharded or pruned models; attributes only confirm them.
    num_heads = q_out // head_dim
    num_kv_heads = k_out // head_dim
    if num_heads % num_kv_heads:
        return None, f"heads: {num_heads} query heads not divisible by {num_kv_heads} kv heads"
    if getattr(config, "attn_logit_softcapping", None) is not None:
        return None, "softcapping: attention logit soft-capping is not supported by TE"
    window = _window(module)
    if window is None:
        return None, f"window: unsupported sliding_window {getattr(module, 'sliding_window', None)!r}"
    scale = getattr(module, "scaling", None)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None, f"scale: non-numeric scaling {scale!r}"
    dispatch = _dispatch_reason(module)
    if dispatch is not None:
        return None, dispatch
    return AttnParams(num_heads, num_kv_heads, head_dim, window, float(scale)), "ok"


def _dispatch_reason(module: torch.nn.Module) -> str | None:
    """None when the module's forward dispatches through transformers' attention interface."""
    forward = getattr(type(module), "forward", None)
    code = getattr(forward, "__code__", None)
    if code is None:
        return "dispatch: forward has no Python code to inspect"
    if "ALL_ATTENTION_FUNCTIONS" in code.co_names or "_attn_implementation" in code.co_names:
        return None
    source_module = sys.modules.get(type(module).__module__)
    if source_module is not None and "scaled_dot_product_attention" in vars(source_module):
        return "dispatch: local import of scaled_dot_product_attention"
    return "dispatch: forward does not use transformers' attention interface"


def infer_attn_params(module: torch.nn.Module) -> AttnParams | None:
    """Heads, head_dim, TE window and softmax scale of a HF attention module; None when the layout does not fit."""
    return check_attention_module(module)[0]
