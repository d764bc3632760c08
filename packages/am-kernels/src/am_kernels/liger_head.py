"""The loss patches of a causal-LM head: fused linear cross entropy (its forward) or cross entropy (its loss).

Both read private transformers contracts that are checked here before anything is built: the base model's
output fields, the output class's cache field, and `loss_function` returning the instance's `_loss_function`.
"""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any

from ._contract import contract_error, parameter_name, require_parameters
from ._patch import Patch, mark, patch_name
from .liger_forwards import CAUSAL_LM_PARAMETERS, LigerOps, cross_entropy_loss, fused_linear_ce_forward
from .liger_modules import NAMES, describe_owner, forward_patch, name_patch
from .liger_plans import LigerPlan
from .sdpa import PinnedForward

# Fields of the base model's output that the fused path reads, besides the cache (renamed in 5.24).
_BASE_OUTPUT_FIELDS = ("last_hidden_state", "hidden_states", "attentions")


def _base_output_cache_field(base: Any) -> str:
    """The cache field of the base model's output class, after checking the other fields the fused path reads."""
    what = f"{type(base).__module__}.{type(base).__qualname__}.forward"
    try:
        annotation = inspect.signature(base.forward).return_annotation
    except (TypeError, ValueError) as exc:
        raise contract_error(what, f"its signature cannot be read ({exc})") from exc
    if isinstance(annotation, str):  # postponed annotations: resolve the plain name in the defining module
        annotation = getattr(inspect.unwrap(type(base).forward), "__globals__", {}).get(
            annotation, annotation
        )
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # `tuple | BaseModelOutputWithPast`
        outputs = [a for a in typing.get_args(annotation) if hasattr(a, "__dataclass_fields__")]
        annotation = outputs[0] if len(outputs) == 1 else annotation
    fields = getattr(annotation, "__dataclass_fields__", None) if isinstance(annotation, type) else None
    missing = [f for f in _BASE_OUTPUT_FIELDS if fields is None or f not in fields]
    if missing:
        raise contract_error(
            what,
            f"expected it to return a model output with {list(_BASE_OUTPUT_FIELDS)} and a cache, "
            f"annotated {annotation!r}",
        )
    return parameter_name(annotation, "past_key_values", f"{what} -> {annotation.__qualname__}")


def _causal_lm_output_cache_field() -> str:
    """The cache field of `CausalLMOutputWithPast` (its constructor's parameter), which the fused path fills."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return parameter_name(
        CausalLMOutputWithPast, "past_key_values", "transformers.modeling_outputs.CausalLMOutputWithPast"
    )


def _check_loss_function_property(model: Any) -> None:
    """`loss_function` must be a property returning the instance's `_loss_function` when there is one."""
    owner = next((c for c in type(model).__mro__ if "loss_function" in vars(c)), None)
    if owner is None:
        raise contract_error(f"{type(model).__qualname__}.loss_function", "the attribute no longer exists")
    what = f"{owner.__module__}.{owner.__qualname__}.loss_function"
    prop = vars(owner)["loss_function"]
    if not isinstance(prop, property) or prop.fget is None:
        raise contract_error(what, f"expected a property reading self._loss_function, found {prop!r}")
    # Probe on a bare instance of the same class (no __init__, nothing patched): it must return ours.
    probe = object.__new__(type(model))
    sentinel = object()
    vars(probe)["_loss_function"] = sentinel
    try:
        result = prop.fget(probe)
    except Exception as exc:
        raise contract_error(what, f"probing it with an instance _loss_function failed ({exc!r})") from exc
    if result is not sentinel:
        raise contract_error(
            what, f"it no longer returns the instance's _loss_function (returned {result!r})"
        )


def _refuse_other_am_forwards(model: Any, plan: LigerPlan) -> None:
    """The fused path replaces the head's forward and reads the base model's output: another am-* forward there
    (a pipeline stage's) returns something else, so name it instead of reporting a changed private contract."""
    attr = plan.base_model_attr or model.base_model_prefix
    base = getattr(model, attr, None)
    for path, module in (("<root>", model), (attr, base)):
        own = vars(module).get("forward") if module is not None else None
        marker = patch_name(own)
        if isinstance(marker, str) and not marker.startswith("am_kernels."):
            raise ValueError(
                f"fused_linear_cross_entropy=True cannot patch {type(model).__name__}: {path} "
                f"({type(module).__name__}).forward is owned by {describe_owner(own)}, whose output the fused "
                "loss cannot read; pass fused_linear_cross_entropy=False (the other kernels still apply)"
            )


def _fused_patches(model: Any, plan: LigerPlan, ops: LigerOps) -> list[Patch]:
    what = f"{type(model).__module__}.{plan.causal_lm_class}.forward"
    _refuse_other_am_forwards(model, plan)
    sig = require_parameters(model.forward, (), what)
    # The fused path reads these by name, so **kwargs alone does not satisfy the contract.
    missing = [name for name in CAUSAL_LM_PARAMETERS if name not in sig.parameters]
    if missing or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        raise contract_error(what, f"expected parameters {list(CAUSAL_LM_PARAMETERS)} and **kwargs in {sig}")
    lm_head = getattr(model, "lm_head", None)
    if lm_head is None or getattr(lm_head, "bias", None) is not None:
        raise contract_error(what, "fused linear cross entropy needs a bias-free lm_head")
    base_attr = plan.base_model_attr or model.base_model_prefix
    if not hasattr(model, base_attr):
        raise contract_error(what, f"the base model attribute {base_attr!r} is missing")
    cache_fields = (
        _base_output_cache_field(getattr(model, base_attr)),
        _causal_lm_output_cache_field(),
    )
    # An SDPA pin on the head stays in force on the training path too, which calls the base model directly.
    pinned = model.forward.backends if isinstance(model.forward, PinnedForward) else None
    func = fused_linear_ce_forward(
        model.forward,
        model,
        ops,
        softcap_attr=plan.softcap_attr,
        base_attr=base_attr,
        cache_fields=cache_fields,
        sdpa_backends=pinned,
    )
    name = NAMES["fused_linear_cross_entropy"]
    return [
        forward_patch(model, func, name),
        name_patch(model, f"{type(model).__name__}+LigerFusedLinearCrossEntropy", name),
    ]


def _cross_entropy_patches(model: Any, plan: LigerPlan, ops: LigerOps) -> list[Patch]:
    if plan.softcap_attr is not None and getattr(model.config, plan.softcap_attr, None) is not None:
        raise ValueError(
            f"cross_entropy=True is not exact for {type(model).__name__}: its logits are soft-capped "
            f"(config.{plan.softcap_attr}); use fused_linear_cross_entropy=True"
        )
    _check_loss_function_property(model)
    name = NAMES["cross_entropy"]
    loss = mark(cross_entropy_loss(ops), name)
    # `loss_function` is a property reading `self._loss_function` first: a per-instance override.
    return [
        Patch(model, "_loss_function", loss),
        name_patch(model, f"{type(model).__name__}+LigerCrossEntropy", name),
    ]


def head_patches(model: Any, plan: LigerPlan, ops: LigerOps, *, fused: bool) -> list[Patch]:
    """The head's patches: its forward (`fused`) or its `_loss_function`, after checking the model is that head."""
    if type(model).__name__ != plan.causal_lm_class:
        kind = "fused_linear_cross_entropy" if fused else "cross_entropy"
        raise ValueError(
            f"{kind}=True patches the {plan.causal_lm_class} head, but the model is {type(model).__name__}; "
            f"pass {kind}=False"
        )
    return _fused_patches(model, plan, ops) if fused else _cross_entropy_patches(model, plan, ops)
