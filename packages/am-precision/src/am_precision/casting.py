"""Cast a model's dtype while keeping `_keep_in_fp32_modules(_strict)` tensors in fp32.

Works on plain, meta-device and FSDP2/DTensor-sharded models. The broad cast is the model's own
`.to(dtype)` (so a transformers `PreTrainedModel.to` override still runs, and FSDP2's `_apply` keeps its
sharded-parameter bookkeeping). Tensors that must stay fp32 are cloned before that cast and written back
afterwards through `nn.Module._apply`, so they never pass through the low dtype: they are restored bit for
bit (an fp32 -> bf16 -> fp32 round trip would keep the dtype but lose the values). Which tensors are kept
is decided by `fp32_rules`: transformers' rule for which list applies to which dtype (strict lists for
float16 and bfloat16, `_keep_in_fp32_modules` for float16 only) and exact dotted-path segments for matching
(see that module's docstring).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager

import torch
from torch import nn

from ._args import check_dtype, check_model
from .fp32_rules import (
    fp32_tensor_names,
    get_fp32_module_keywords,
    has_dtensor_params,
    name_matches,
)


def _fsdp_module_class() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # torch without distributed / FSDP2
        return None
    return FSDPModule


def _check_fsdp_units(model: nn.Module, kept_params: list[str]) -> None:
    """Raise ValueError when a kept-fp32 parameter shares its FSDP2 unit with a lower-precision one.

    FSDP2 all-gathers one flat buffer per unit and requires one dtype inside it; restoring a single
    parameter to fp32 there would break the next forward. Checked before anything is cast.
    """
    fsdp_cls = _fsdp_module_class()
    if fsdp_cls is None or not kept_params:
        return
    modules = dict(model.named_modules(remove_duplicate=False))
    fsdp_names = {name for name, m in modules.items() if isinstance(m, fsdp_cls)}
    if not fsdp_names:
        return
    kept = set(kept_params)

    def unit_of(param_name: str) -> str | None:
        parts = param_name.split(".")[:-1]
        for i in range(len(parts), -1, -1):
            prefix = ".".join(parts[:i])
            if prefix in fsdp_names:
                return prefix
        return None

    units: dict[str, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        unit = unit_of(name)
        if unit is not None and param.requires_grad:
            units.setdefault(unit, []).append(name)
    for name in kept_params:
        unit = unit_of(name)
        if unit is None:
            continue
        mixed = [n for n in units.get(unit, []) if n not in kept]
        if mixed:
            label = unit or "<root>"
            raise ValueError(
                f"cannot keep {name!r} in fp32: it shares the FSDP2 unit {label!r} with parameters that are "
                f"cast to the low dtype ({mixed[:4]}{' ...' if len(mixed) > 4 else ''}); FSDP2 needs one dtype "
                "per unit. Call fully_shard() on the fp32 module separately, or pass it in skip_modules"
            )


def _check_skip_modules(model: nn.Module, skip_modules: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(skip_modules, (str, bytes)):
        raise TypeError(f"skip_modules must be a tuple of child names, got the string {skip_modules!r}")
    try:
        skip = tuple(skip_modules)
    except TypeError:
        raise TypeError(
            f"skip_modules must be a tuple of child names, got {type(skip_modules).__name__} {skip_modules!r:.80}"
        ) from None
    bad = [s for s in skip if not isinstance(s, str)]
    if bad:
        raise TypeError(f"skip_modules must hold child names (str), got {bad!r:.80}")
    children = [name for name, child in model._modules.items() if child is not None]
    unknown = [s for s in skip if s not in children]
    if unknown:
        raise ValueError(
            f"skip_modules {unknown} are not immediate submodules of the model; expected some of {children}"
        )
    return skip


@contextmanager
def _detached(model: nn.Module, names: tuple[str, ...]) -> Iterator[None]:
    # Setting the slot to None (instead of deleting it) keeps the children's order, hence state_dict order;
    # nn.Module._apply skips None children, so model.to() never visits them.
    saved = {name: model._modules[name] for name in names}
    for name in names:
        model._modules[name] = None
    try:
        yield
    finally:
        for name, child in saved.items():
            model._modules[name] = child


def _tensors_by_name(model: nn.Module, params: list[str], buffers: list[str]) -> dict[str, torch.Tensor]:
    found: dict[str, torch.Tensor] = {}
    wanted_p, wanted_b = set(params), set(buffers)
    for name, t in model.named_parameters(remove_duplicate=False):
        if name in wanted_p:
            found[name] = t
    for name, t in model.named_buffers(remove_duplicate=False):
        if name in wanted_b:
            found[name] = t
    return found


def _write_back(model: nn.Module, values: dict[int, torch.Tensor]) -> None:
    """Replace the tensors whose id is in `values` through nn.Module._apply (DTensor/FSDP2-safe)."""
    if not values:
        return

    def fn(t: torch.Tensor) -> torch.Tensor:
        return values.get(id(t), t)

    model._apply(fn)


def cast_model_to_dtype(
    model: nn.Module, dtype: torch.dtype = torch.bfloat16, skip_modules: tuple[str, ...] = ()
) -> None:
    """Cast the model's floating tensors to `dtype`, keeping `_keep_in_fp32_modules(_strict)` tensors in fp32.

    Which keywords apply follows transformers' loader for that dtype: `_keep_in_fp32_modules_strict` for
    float16 and bfloat16, `_keep_in_fp32_modules` for float16 only, none for float32/float64 (so a bf16
    cast of a model whose forward casts activations to a non-strict module's dtype stays runnable).
    Unsharded models (plain or meta tensors): every parameter and buffer matching an applicable keyword
    ends in fp32, restored exactly from a pre-cast clone. FSDP2/DTensor-sharded models: parameters matching a *strict*
    keyword are kept (each must be its own FSDP unit, else ValueError before anything changes); non-strict
    keywords keep only buffers, because their parameters may share a unit with low-precision ones. DTensor
    parameters keep their placements. `skip_modules` names immediate children that are not touched at all
    (the way to keep an fp32 parameter once FSDP2 has sharded it: make it its own fp32 unit and skip it).
    Keyword matching uses exact dotted-path segments (`am_precision.fp32_rules`).
    """
    check_model(model)
    check_dtype(dtype, "dtype")
    skip = _check_skip_modules(model, skip_modules)
    with _detached(model, skip):
        sharded = has_dtensor_params(model)
        params, buffers = fp32_tensor_names(model, dtype=dtype, sharded=sharded)
        if sharded:
            _check_fsdp_units(model, params)
        kept = _tensors_by_name(model, params, buffers)
        # Snapshot only what the broad cast would change; an fp32 target loses nothing.
        snapshots = {n: t.detach().clone() for n, t in kept.items() if dtype != torch.float32}
        model.to(dtype)
        if not kept:
            return
        after = _tensors_by_name(model, params, buffers)
        values: dict[int, torch.Tensor] = {}
        for name, tensor in after.items():
            if name in snapshots:  # empty when dtype is fp32: the broad cast already made them fp32
                values[id(tensor)] = snapshots[name].to(torch.float32)
        _write_back(model, values)


def yield_fp32_model(
    model: nn.Module, restore_dtype: torch.dtype | None = None
) -> AbstractContextManager[nn.Module]:
    """Run a block with the whole model in fp32, then cast it to `restore_dtype` (default: its dtype before).

    For from-scratch weight init: sampling in fp32 and rounding once keeps the init statistics that
    sampling directly in bf16 distorts. Both casts go through `cast_model_to_dtype`, so fp32-kept tensors
    stay fp32 on exit and a bf16 model whose values are untouched comes back bit-identical. The default
    restore dtype is that of the first floating parameter not kept in fp32. The exit cast also runs when the
    block raises. The arguments are checked when this is called, before the `with` block.
    """
    check_model(model)
    if restore_dtype is None:
        restore_dtype = _model_dtype(model)
    else:
        check_dtype(restore_dtype, "restore_dtype")
    return _fp32_block(model, restore_dtype)


@contextmanager
def _fp32_block(model: nn.Module, restore_dtype: torch.dtype) -> Iterator[nn.Module]:
    cast_model_to_dtype(model, torch.float32)
    try:
        yield model
    finally:
        cast_model_to_dtype(model, restore_dtype)


def _model_dtype(model: nn.Module) -> torch.dtype:
    keywords = get_fp32_module_keywords(model)
    first: torch.dtype | None = None
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if first is None:
            first = param.dtype
        if not name_matches(name, keywords):
            return param.dtype
    return first if first is not None else torch.float32


def cast_frozen_modules_to_compute_dtype(model: nn.Module, compute_dtype: torch.dtype | None) -> None:
    """Cast the floating tensors of fully frozen submodules to `compute_dtype` (fp32-master-weights setups).

    A frozen tower kept in fp32 next to bf16 trainable modules would feed fp32 activations into bf16 matmuls.
    For each maximal submodule that has parameters and none of them trainable: plain (unsharded) parameters
    are cast, DTensor parameters are left alone (FSDP2 all-gathers them in the compute dtype, and changing a
    sharded parameter's dtype in place desyncs its bookkeeping), and buffers are always cast (FSDP2 never
    shards buffers). Tensors matching the fp32 keywords that apply to `compute_dtype` (as in
    `cast_model_to_dtype`) stay fp32. No-op when `compute_dtype` is None.
    """
    check_model(model)
    if compute_dtype is None:
        return
    check_dtype(compute_dtype, "compute_dtype")
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch without distributed
        DTensor = ()  # type: ignore[assignment,misc]
    keywords = get_fp32_module_keywords(model, dtype=compute_dtype)

    def frozen(module: nn.Module) -> bool:
        params = list(module.parameters())
        return bool(params) and not any(p.requires_grad for p in params)

    roots: list[tuple[str, nn.Module]] = []

    def walk(prefix: str, module: nn.Module) -> None:
        if frozen(module):
            roots.append((prefix, module))
            return
        for child_name, child in module.named_children():
            walk(f"{prefix}.{child_name}" if prefix else child_name, child)

    walk("", model)
    with torch.no_grad():
        for prefix, root in roots:
            for sub_name, sub in root.named_modules(prefix=prefix):
                for key, param in list(sub._parameters.items()):
                    full = f"{sub_name}.{key}" if sub_name else key
                    if (
                        param is None
                        or isinstance(param, DTensor)
                        or not param.is_floating_point()
                        or param.dtype == compute_dtype
                        or name_matches(full, keywords)
                    ):
                        continue
                    param.data = param.data.to(compute_dtype)
                for key, buf in list(sub._buffers.items()):
                    full = f"{sub_name}.{key}" if sub_name else key
                    if (
                        buf is None
                        or not buf.is_floating_point()
                        or buf.dtype == compute_dtype
                        or name_matches(full, keywords)
                    ):
                        continue
                    sub._buffers[key] = buf.to(compute_dtype)


__all__ = ["cast_frozen_modules_to_compute_dtype", "cast_model_to_dtype", "yield_fp32_model"]
