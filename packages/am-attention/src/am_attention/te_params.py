"""Read attention hyper-parameters off a Hugging Face attention module, without running it.

Whether the module's forward hands the kernel what it needs is a behaviour question, probed by `te_probe`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["AttnParams", "infer_attn_params", "proj_out_features"]


@dataclass(frozen=True)
class AttnParams:
    """What a DotProductAttention kernel needs; `window_size` is TE's `(left, right)` ((-1, 0) = full causal)."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    window_size: tuple[int, int]
    softmax_scale: float
    sinks: str | None = None  # name of the module's parameter the forward passes as `s_aux` (learnable sinks)


def _proj_features(proj: torch.nn.Module | None, attr: str, dim: int) -> int | None:
    """`proj.<attr>`, else `weight.shape[dim]` (meta-safe), else the same of a `.linear` child."""
    if proj is None:
        return None
    value = getattr(proj, attr, None)
    if isinstance(value, int):
        return value
    weight = getattr(proj, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[dim])
    inner = getattr(proj, "linear", None)
    if isinstance(inner, torch.nn.Module) and inner is not proj:
        return _proj_features(inner, attr, dim)
    return None


def _require_module(value: object, name: str, *, optional: bool = False) -> None:
    if (value is None and optional) or isinstance(value, torch.nn.Module):
        return
    raise TypeError(f"{name} must be a torch.nn.Module{' or None' if optional else ''}, got {value!r}")


def proj_out_features(proj: torch.nn.Module | None) -> int | None:
    """Output features of a projection: `out_features`, else `weight.shape[0]` (meta-safe), else a `.linear` child."""
    _require_module(proj, "proj", optional=True)
    return _proj_features(proj, "out_features", 0)


def proj_in_features(proj: torch.nn.Module | None) -> int | None:
    """Input features of a projection: `in_features`, else `weight.shape[1]` (meta-safe), else a `.linear` child."""
    return _proj_features(proj, "in_features", 1)


def _int_attr(obj: object, *names: str) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def layer_type_of(module: torch.nn.Module) -> str | None:
    """The module's entry of its config's `layer_types` (indexed by its `layer_idx`); None without one."""
    types = getattr(getattr(module, "config", None), "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if not isinstance(types, (list, tuple)) or isinstance(index, bool) or not isinstance(index, int):
        return None
    if not 0 <= index < len(types) or not isinstance(types[index], str):
        return None
    return types[index]


def window_of(module: torch.nn.Module) -> tuple[int, int] | None:
    """TE window for the module's sliding window W: (W-1, 0); (-1, 0) when the layer attends to all keys.

    The layer's entry of `config.layer_types` decides first: "full_attention" attends to all keys even
    when the module keeps the config's window (Exaone 4 stores it on every layer and passes it only on
    sliding ones). Otherwise the module's own `sliding_window` attribute wins (Qwen2/Gemma3 set it per
    layer, None on full layers); without it the config's (Mistral reads `config.sliding_window` at call time).
    """
    layer_type = layer_type_of(module)
    if layer_type == "full_attention":
        return (-1, 0)
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
    """`(params, "ok")` when the module's layout fits the kernel, else `(None, reason)`; pure, runs nothing."""
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
    window = window_of(module)
    if window is None:
        return None, f"window: unsupported sliding_window {getattr(module, 'sliding_window', None)!r}"
    scale = getattr(module, "scaling", None)
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool):
        return None, f"scale: non-numeric scaling {scale!r}"
    return AttnParams(num_heads, num_kv_heads, head_dim, window, float(scale)), "ok"


def infer_attn_params(module: torch.nn.Module) -> AttnParams | None:
    """Heads, head_dim, TE window and softmax scale of a HF attention module; None when the layout does not fit.

    Reads the module only: whether its forward can hand the kernel what it needs is `plan_te_attention`'s question.
    """
    _require_module(module, "module")
    return check_attention_module(module)[0]
