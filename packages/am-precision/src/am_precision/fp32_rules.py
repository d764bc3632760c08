"""Which tensors stay in fp32: keywords from `_keep_in_fp32_modules(_strict)` and how they match names.

Which list applies to which dtype is transformers' own rule (``PreTrainedModel._get_dtype_plan``, the
dtype handling of ``from_pretrained``, the same in every 5.x release we support):
``_keep_in_fp32_modules_strict`` stays fp32 for a float16 *and* a bfloat16 target, ``_keep_in_fp32_modules``
only for a float16 target (it exists against fp16 overflow; a model whose forward casts activations to
those modules' dtype breaks when they stay fp32 in a bf16 model), and nothing is kept for any other
target (float32, float64). ``tests/test_fp32_rules.py`` checks this against the installed transformers.

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

from ._args import check_bool, check_dtype, check_model

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
    check_model(model)
    keywords: list[str] = []
    for name, module in model.named_modules():
        owner = f"{type(module).__name__}({name or 'root'})"
        for attr in attrs:
            keywords.extend(_as_keywords(getattr(module, attr, None), owner, attr))
    return list(dict.fromkeys(keywords))


def _check_target_dtype(dtype: object) -> torch.dtype | None:
    return None if dtype is None else check_dtype(dtype, "dtype")


def _attrs_for(dtype: torch.dtype | None, *, strict_only: bool = False) -> tuple[str, ...]:
    """Which `_keep_in_fp32_modules*` lists apply to a cast to `dtype` (None: every declared list)."""
    if dtype is None:
        return ("_keep_in_fp32_modules_strict",) if strict_only else _KEEP_ATTRS
    if dtype == torch.float16 and not strict_only:
        return _KEEP_ATTRS
    if dtype in (torch.float16, torch.bfloat16):
        return ("_keep_in_fp32_modules_strict",)
    return ()


def get_fp32_module_keywords(model: nn.Module, *, dtype: torch.dtype | None = None) -> list[str]:
    """Keywords from `_keep_in_fp32_modules_strict` then `_keep_in_fp32_modules`, de-duplicated in order.

    `dtype=None`: every declared keyword. With a target dtype: those transformers keeps in fp32 when
    loading in that dtype (strict for float16/bfloat16, non-strict for float16 only; see module doc).
    """
    return _collect(model, _attrs_for(_check_target_dtype(dtype)))


def get_strict_fp32_module_keywords(model: nn.Module, *, dtype: torch.dtype | None = None) -> list[str]:
    """Keywords from `_keep_in_fp32_modules_strict` (those that apply to `dtype` when given)."""
    return _collect(model, _attrs_for(_check_target_dtype(dtype), strict_only=True))


def name_matches(name: str, keywords: Iterable[str]) -> bool:
    """True when any keyword's dotted segments equal a contiguous run of `name`'s segments (see module doc).

    `keywords` is an iterable of dotted names (a bare string is a TypeError: it would be read as one
    keyword per character).
    """
    if not isinstance(name, str):
        raise TypeError(f"name must be a str (a dotted module path), got {type(name).__name__} {name!r:.80}")
    if isinstance(keywords, (str, bytes)) or not isinstance(keywords, Iterable):
        hint = f"; did you mean [{keywords!r}]?" if isinstance(keywords, str) else ""
        raise TypeError(
            f"keywords must be a list/tuple/set of dotted module names, got {type(keywords).__name__} "
            f"{keywords!r:.80}{hint}"
        )
    segments = name.split(".") if name else []
    for keyword in keywords:
        if not isinstance(keyword, str) or not keyword or "" in keyword.split("."):
            raise ValueError(f"keywords must be non-empty dotted module names like 'norm', got {keyword!r}")
        kw = keyword.split(".")
        n = len(kw)
        if any(segments[i : i + n] == kw for i in range(len(segments) - n + 1)):
            return True
    return False


def has_dtensor_params(model: nn.Module) -> bool:
    """True when any parameter is a DTensor (FSDP2- or TP-sharded)."""
    check_model(model)
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


def fp32_tensor_names(
    model: nn.Module, *, dtype: torch.dtype = torch.bfloat16, sharded: bool | None = None
) -> tuple[list[str], list[str]]:
    """Names of the (parameters, buffers) that `cast_model_to_dtype(model, dtype)` keeps in fp32.

    Only the keywords that apply to `dtype` count (see module doc). Unsharded: every floating tensor
    matching one of them. Sharded (DTensor parameters, or `sharded=True`): parameters only for strict
    keywords (they must be their own fp32 FSDP unit), buffers for every applicable keyword (buffers are
    plain tensors that FSDP2 does not manage).
    """
    check_model(model)
    check_dtype(dtype, "dtype")
    if sharded is not None:
        check_bool(sharded, "sharded")
    all_kw = get_fp32_module_keywords(model, dtype=dtype)
    if not all_kw:
        return [], []
    if sharded is None:
        sharded = has_dtensor_params(model)
    param_kw = get_strict_fp32_module_keywords(model, dtype=dtype) if sharded else all_kw
    params = [
        n for n, p in _named_tensors(model, "param") if p.is_floating_point() and name_matches(n, param_kw)
    ]
    buffers = [
        n for n, b in _named_tensors(model, "buffer") if b.is_floating_point() and name_matches(n, all_kw)
    ]
    return params, buffers


def get_fp32_parameter_names(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Parameter names that stay fp32 after `cast_model_to_dtype(model, dtype)`; pure (no cast).

    For `am doctor`: the list depends on the model's current state (sharded or not), exactly as the cast
    would decide it. Tensors in `skip_modules` are not included (they keep whatever dtype they have).
    """
    return fp32_tensor_names(model, dtype=dtype)[0]


__all__ = ["get_fp32_module_keywords", "get_fp32_parameter_names"]
