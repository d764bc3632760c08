"""Apply Liger's kernels to one model instance, all-or-nothing and reversibly.

Every replacement is written into a module instance's own `__dict__` through a `Patch`:
no class, no transformers module attribute and no torch function is changed, so other
models (and other threads) are unaffected. Rotary embeddings are the one place where
transformers calls a module-level function (`apply_rotary_pos_emb`); instead of swapping it
in the modeling module, each attention instance is bound to a copy of its class's forward
(one copy per class and patch call) whose global lookup of that one name resolves to Liger's
rope (see `rebind.with_global`). The per-module patches live in `liger_modules`, the loss
patches of the causal-LM head in `liger_head`; this module picks the plan and applies them.
"""

from __future__ import annotations

import copy
from typing import Any, TypeVar

import torch

from ._contract import contract_error
from ._patch import Patch, PatchSet
from ._repr import short_repr
from .liger_forwards import LigerOps, load_liger_ops
from .liger_head import head_patches
from .liger_modules import RopeCopies, mlp_patches, norm_patches, rope_patches
from .liger_plans import LIGER_PLANS, REFUSED, LigerPlan, supported_model_types

M = TypeVar("M")

HANDLE_ATTR = "_am_liger_kernel"


class LigerKernelPatch:
    """The applied patches of one model, kept on the model so that unpatching needs no registry."""

    def __init__(self, options: dict[str, bool], model_type: str, patches: PatchSet) -> None:
        self.options = options
        self.model_type = model_type
        self.patches = patches

    def __repr__(self) -> str:
        return f"LigerKernelPatch({self.model_type!r}, {self.options}, {len(self.patches)} patches)"

    def revert(self) -> None:
        # PatchSet.revert checks every patch first: a foreign patch on one module never half-reverts the model.
        self.patches.revert()

    def __reduce__(self) -> tuple:
        # pickle / torch.save keep weights, not kernels: the bound Liger forwards pickle by name and load as
        # the class's own, so the loaded model is plain; it must not claim a patch it no longer runs
        return (_not_patched, ())

    def __deepcopy__(self, memo: dict) -> LigerKernelPatch:
        # a deep copy does keep the kernels (bound methods rebind to the copy): copy the handle with it
        new = object.__new__(type(self))
        memo[id(self)] = new
        vars(new).update(copy.deepcopy(vars(self), memo))
        return new


def _not_patched() -> None:
    """What a pickled `LigerKernelPatch` loads as: no patch (see `LigerKernelPatch.__reduce__`)."""
    return None


def _check_model(model: Any) -> Any:
    """The model's config, after checking that `model` is a torch module with one."""
    config = getattr(model, "config", None) if isinstance(model, torch.nn.Module) else None
    if config is None:
        raise TypeError(
            f"model must be a transformers model (a torch.nn.Module with .config), got {short_repr(model)}"
        )
    return config


def _resolve_plan(model: Any) -> tuple[str, LigerPlan]:
    config = _check_model(model)
    model_type = getattr(config, "model_type", None)
    # Vision-language models: patch their language model when its type has a row.
    text_config = getattr(config, "text_config", None)
    text_type = getattr(text_config, "model_type", None) if text_config is not None else None
    for candidate in (model_type, text_type):
        if not isinstance(candidate, str):
            continue
        if candidate in LIGER_PLANS:
            return candidate, LIGER_PLANS[candidate]
        if candidate in REFUSED:
            raise ValueError(
                f"patch_liger_kernel refuses model ({type(model).__name__}) with model_type {candidate!r}: "
                f"{REFUSED[candidate]}"
            )
    shown = model_type if text_type is None else f"{model_type} (text_config: {text_type})"
    raise ValueError(
        f"patch_liger_kernel does not support model ({type(model).__name__}) with model_type {shown!r}; "
        f"supported: {', '.join(supported_model_types())}"
    )


def _language_config(model: Any, model_type: str) -> Any:
    config = model.config
    return config if config.model_type == model_type else config.text_config


def _rotary_fraction(config: Any) -> Any:
    """`partial_rotary_factor` of the config (top level, or in `rope_parameters`, also per layer type)."""
    found = {getattr(config, "partial_rotary_factor", 1.0)}
    params = getattr(config, "rope_parameters", None)
    for table in (params, *(params.values() if isinstance(params, dict) else ())):
        if isinstance(table, dict):
            found.add(table.get("partial_rotary_factor", 1.0))
    found.discard(1.0)
    return found.pop() if found else 1.0


def kernel_refusals(model_type: str, plan: LigerPlan, config: Any) -> dict[str, str]:
    """Why each kernel is not exact for this model (its plan row, then its config); absent kernels are exact."""
    reasons = {kernel: reason for kernel, reason in plan.unsupported}
    fraction = _rotary_fraction(config)
    if "rope" not in reasons and fraction != 1.0:
        reasons["rope"] = (
            f"config rotates only part of each head (partial_rotary_factor {fraction}); "
            "Liger's rope rotates the whole head"
        )
    return reasons


def _resolve_options(
    model_type: str, requested: dict[str, bool | None], refusals: dict[str, str]
) -> dict[str, bool]:
    """None: on where exact for this model. True for a kernel that is not: ValueError naming the reason."""
    options = {}
    for key, value in requested.items():
        if value and key in refusals:
            raise ValueError(
                f"{key}=True is not exact for model_type {model_type!r}: {refusals[key]}; pass {key}=False"
            )
        options[key] = key not in refusals if value is None else value
    return options


def patch_liger_kernel(
    model: M,
    *,
    rope: bool | None = None,
    rms_norm: bool | None = None,
    swiglu: bool | None = None,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    ops: LigerOps | None = None,
) -> M:
    """Replace `model`'s RMSNorm, gated MLP, rotary embedding and loss with Liger's kernels; returns `model`.

    Only this instance changes (its submodules' `forward`/`_get_name` and, for the loss, its
    own `forward` or `_loss_function`); `unpatch_liger_kernel(model)` restores everything.
    The plan is chosen by `config.model_type` (or `config.text_config.model_type` for VLMs)
    from `LIGER_PLANS`; `swiglu` covers the architecture's gated MLP (GEGLU for Gemma). `rope`,
    `rms_norm` and `swiglu` default to None: on wherever the kernel is exact for this model (its
    plan row and config); True for a kernel that is not raises ValueError with the reason. The
    fused loss runs only in training mode with labels; eval keeps transformers' forward.
    `ops` replaces the kernel source (default: liger-kernel). Nothing is changed if any step fails.
    """
    for key, value in (
        ("cross_entropy", cross_entropy),
        ("fused_linear_cross_entropy", fused_linear_cross_entropy),
    ):
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be a bool, got {short_repr(value)}")
    for key, value in (("rope", rope), ("rms_norm", rms_norm), ("swiglu", swiglu)):
        if value is not None and not isinstance(value, bool):
            raise TypeError(f"{key} must be a bool or None, got {short_repr(value)}")
    if ops is not None and not isinstance(ops, LigerOps):
        raise TypeError(f"ops must be a LigerOps (see load_liger_ops()) or None, got {short_repr(ops)}")
    if cross_entropy and fused_linear_cross_entropy:
        raise ValueError(
            "cross_entropy=True and fused_linear_cross_entropy=True are exclusive; set one of them to False"
        )
    model_type, plan = _resolve_plan(model)
    config = _language_config(model, model_type)
    requested = {
        "rope": rope,
        "rms_norm": rms_norm,
        "swiglu": swiglu,
        "cross_entropy": cross_entropy,
        "fused_linear_cross_entropy": fused_linear_cross_entropy,
    }
    options = _resolve_options(model_type, requested, kernel_refusals(model_type, plan, config))
    existing = vars(model).get(HANDLE_ATTR)
    if isinstance(existing, LigerKernelPatch):
        if existing.options == options:
            return model
        raise ValueError(
            f"model is already Liger-patched with {existing.options}; call unpatch_liger_kernel(model) "
            f"before patching with {options}"
        )
    if ops is None:
        ops = load_liger_ops()

    patches = PatchSet(name="am_kernels.liger_kernel")
    found = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    ropes = RopeCopies(ops, plan)
    for path, module in model.named_modules():
        cls_name = type(module).__name__
        if options["rms_norm"] and cls_name == plan.norm_class:
            patches.patches.extend(norm_patches(module, path, plan, ops))
            found["rms_norm"] += 1
        elif options["swiglu"] and cls_name == plan.mlp_class:
            patches.patches.extend(mlp_patches(module, path, plan, ops, config))
            found["swiglu"] += 1
        elif options["rope"] and cls_name == plan.attention_class:
            rope_patch = rope_patches(module, path, ropes)
            patches.patches.extend(rope_patch)
            found["rope"] += bool(rope_patch)
    expected = {"rms_norm": plan.norm_class, "swiglu": plan.mlp_class, "rope": plan.attention_class}
    optional = {"swiglu": plan.mlp_optional}
    for key, count in found.items():
        if options[key] and count == 0 and not optional.get(key, False):
            raise contract_error(
                f"patch_liger_kernel({model_type})",
                f"no {expected[key]} module found in {type(model).__name__}",
            )
    if cross_entropy or fused_linear_cross_entropy:
        patches.patches.extend(head_patches(model, plan, ops, fused=fused_linear_cross_entropy))

    handle = LigerKernelPatch(options, model_type, patches)
    # First in the set, so it is reverted last; the handle carries the undo with the model.
    patches.patches.insert(0, Patch(model, HANDLE_ATTR, handle))
    patches.apply()
    return model


def get_liger_kernel_patch(model: Any) -> LigerKernelPatch | None:
    """The handle of `patch_liger_kernel(model)`, or None when the model is not patched (or not a model)."""
    try:
        handle = vars(model).get(HANDLE_ATTR)
    except TypeError:  # no __dict__: never patched
        return None
    return handle if isinstance(handle, LigerKernelPatch) else None


def unpatch_liger_kernel(model: M) -> M:
    """Undo `patch_liger_kernel(model)` exactly; a no-op on an unpatched model. Returns `model`."""
    handle = get_liger_kernel_patch(model)
    if handle is not None:
        handle.revert()
    return model


__all__ = [
    "LigerKernelPatch",
    "get_liger_kernel_patch",
    "patch_liger_kernel",
    "unpatch_liger_kernel",
]
