"""Which tensors stay in fp32: keywords from `_keep_in_fp32_modules(_strict)` and how they match names.

Matching rule (exact dotted-path segments). A name such as ``model.layers.0.input_layernorm.weight`` is
split on ``.`` into segments. A keyword matches the name when the keyword's own segments (``"norm"`` is one
segment, ``"mlp.gate.weight"`` is three) appear in the name as a contiguous run of whole segments. So:

- ``norm`` matches ``model.norm`` and ``model.norm.weight``;
- ``norm`` does not match ``model.layers.0.input_layernorm`` nor ``model.normalizer_proj`` (no segment
  equals ``norm``); models that want those in fp32 name them (``input_layernorm``), as every transformers
  model declaring these lists does (GPT-OSS, AFMoE and DeepSeek-V4 list each norm by its own name);
- ``mlp.gate.weight`` matches ``model.layers.3.mlp.gate.weight`` but not ``model.layers.3.mlp.gate_proj.weight``;
- ``wo`` (T5) matches ``encoder.block.0.layer.1.DenseReluDense.wo.weight`` but not ``...SelfAttention.o``.

This is the rule transformers 4.x applied (``(^|\\.)kw($|\\.)``). transformers 5.x's loader searches the
keyword as a regular expression anywhere in the name (so ``norm`` also hits ``input_layernorm`` and
``normalizer_proj``); the seed used plain substrings. We deliberately keep the segment rule: it keeps
exactly what a model names and never an unrelated module that happens to contain the word.

A module matches when its own path matches; a parameter or buffer matches when its full name matches,
which covers both "the module is listed" and "the tensor itself is listed" (``attn_hc.fn``).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

_KEEP_ATTRS = ("_keep_in_fp32_modules_strict", "_keep_in_fp32_modules")


def _as_keywords(value: object, owner: str, attr: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        # A bare string is almost always a forgotten list bracket; treating it as an iterable of
        # characters would keep every module whose path has a one-letter segment.
        raise TypeError(f"{owner}.{attr} must be a list/set/tuple of module names, got the string {value!r}")
    if not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{owner}.{attr} must be a list/set/tuple of module names, got {type(value).__name__}"
        )
    items = sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    bad = [v for v in items if not isinstance(v, str) or not v or v.startswith(".") or v.endswith(".")]
    if bad:
        raise ValueError(
            f"{owner}.{attr} has invalid entries {bad!r}; expected dotted module names like 'norm'"
        )
    return items


def _collect(model: nn.Module, attrs: tuple[str, ...]) -> list[str]:
    # transformers' post_init merges children's lists into the top model; walking every submodule gives
    # the same result for plain nn.Module wrappers around a transformers model.
    keywords: list[str] = []
    for name, module in model.named_modules():
        owner = f"{type(module).__name__}({name or 'root'})"
        for attr in attrs:
            keywords.extend(_as_keywords(getattr(module, attr, None), owner, attr))
    return list(dict.fromkeys(keywords))


def get_fp32_module_keywords(model: nn.Module) -> list[str]:
    """All keywords from `_keep_in_fp32_modules_strict` and `_keep_in_fp32_modules`, de-duplicated in order."""
    return _collect(model, _KEEP_ATTRS)


def get_strict_fp32_module_keywords(model: nn.Module) -> list[str]:
    """Keywords from `_keep_in_fp32_modules_strict` only."""
    return _collect(model, ("_keep_in_fp32_modules_strict",))


def name_matches(name: str, keywords: Iterable[str]) -> bool:
    """True when any keyword's dotted segments equal a contiguous run of `name`'s segments (see module doc)."""
    segments = name.split(".") if name else []
    for keyword in keywords:
        kw = keyword.split(".")
        n = len(kw)
        if any(segments[i : i + n] == kw for i in range(len(segments) - n + 1)):
            return True
    return False


def has_dtensor_params(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2- or TP-sharded)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def _named_tensors(model: nn.Module, kind: str) -> Iterator[tuple[str, torch.Tensor]]:
    # remove_duplicate=False keeps tied tensors under every name so a match on any alias counts.
    if kind == "param":
        yield from model.named_parameters(remove_duplicate=False)
    else:
        yield from model.named_buffers(remove_duplicate=False)


def fp32_tensor_names(model: nn.Module, *, sharded: bool | None = None) -> tuple[list[str], list[str]]:
    """Names of the (parameters, buffers) that `cast_model_to_dtype` keeps in fp32.

    Unsharded: every floating tensor matching any keyword. Sharded (DTensor parameters, or
    `sharded=True`): parameters only for strict keywords (they must be their own fp32 FSDP unit), buffers
    for every keyword (buffers are plain tensors that FSDP2 does not manage).
    """
    all_kw = get_fp32_module_keywords(model)
    if not all_kw:
        return [], []
    if sharded is None:
        sharded = has_dtensor_params(model)
    param_kw = get_strict_fp32_module_keywords(model) if sharded else all_kw
    params = [
        n for n, p in _named_tensors(model, "param") if p.is_floating_point() and name_matches(n, param_kw)
    ]
    buffers = [
        n for n, b in _named_tensors(model, "buffer") if b.is_floating_point() and name_matches(n, all_kw)
    ]
    return params, buffers


def get_fp32_parameter_names(model: nn.Module) -> list[str]:
    """Parameter names that stay fp32 after `cast_model_to_dtype(model, torch.bfloat16)`; pure (no cast).

    For `am doctor`: the list depends on the model's current state (sharded or not), exactly as the cast
    would decide it. Tensors in `skip_modules` are not included (they keep whatever dtype they have).
    """
    return fp32_tensor_names(model)[0]


__all__ = [
    "fp32_tensor_names",
    "get_fp32_module_keywords",
    "get_fp32_parameter_names",
    "get_strict_fp32_module_keywords",
    "has_dtensor_params",
    "name_matches",
]
