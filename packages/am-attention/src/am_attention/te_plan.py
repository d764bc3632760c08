"""Which attention modules of a model can take the kernel, and why not; pure (nothing is changed).

A module is decided by its layout (`te_params.check_attention_module`, read off the module) and by its
forward's behaviour (`te_probe.check_dispatch`, one probe per attention class and kind of layer, cached). A
broken private contract (a forward that drops ``**kwargs`` or ``sliding_window``, a ``repeat_kv`` with another
layout) is kept as the error that `inject_te_attention` raises in its first phase when no other module of the
model can be taken; otherwise only that module is skipped.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import logging
import sys
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._contract import contract_error, require_parameters, require_result
from .te_dispatch import KERNEL_ATTR, PARAMS_ATTR
from .te_params import AttnParams, check_attention_module, layer_type_of
from .te_probe import check_dispatch

__all__ = ["plan_te_attention"]

logger = logging.getLogger(__name__)

STATE_ATTR = "_am_te_state"  # the injection's record on each module it changed (see te_inject)


class Decision(NamedTuple):
    params: AttnParams | None  # None: the layout does not fit
    reason: str  # why not taken ("" when taken), or the layout's reason
    error: RuntimeError | None = None  # a broken contract: injecting raises it before any change


def default_dot_product_attention_cls() -> Callable[..., torch.nn.Module]:
    """transformer_engine.pytorch.DotProductAttention when transformer-engine is installed, else the reference."""
    if importlib.util.find_spec("transformer_engine") is not None:
        import transformer_engine.pytorch as te  # the [te] extra; import errors propagate

        return te.DotProductAttention
    from .reference import ReferenceDotProductAttention

    logger.info("transformer-engine is not installed; using the SDPA reference DotProductAttention")
    return ReferenceDotProductAttention


def is_candidate(module: torch.nn.Module) -> bool:
    if any(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("q_proj", "k_proj", "v_proj")):
        return True
    return type(module).__name__.endswith("Attention") and any(True for _ in module.children())


def is_injected(module: torch.nn.Module) -> bool:
    """The module runs the kernel of one of our injections (its own, or a copy's)."""
    return STATE_ATTR in vars(module) and isinstance(vars(module).get(PARAMS_ATTR), AttnParams)


def has_foreign_kernel(module: torch.nn.Module) -> bool:
    return not is_injected(module) and (KERNEL_ATTR in vars(module) or KERNEL_ATTR in module._modules)


def _repeat_kv_contract(repeat_kv: Any, what: str) -> None:
    """te_attention_forward undoes an expanded K/V with ``key[:, ::n_rep]``: kv head i repeated contiguously."""
    sig = require_parameters(repeat_kv, (), what)
    params = list(sig.parameters.values())
    if [p.name for p in params[:2]] != ["hidden_states", "n_rep"] or any(
        p.default is inspect.Parameter.empty for p in params[2:]
    ):
        raise contract_error(what, f"expected the signature (hidden_states, n_rep), found {sig}")
    kv = torch.arange(2.0).view(1, 2, 1, 1)
    out = repeat_kv(kv, 3)
    # flattened so the error reads as one line
    heads = out.flatten().tolist() if isinstance(out, torch.Tensor) else out
    require_result(
        what,
        heads,
        lambda h: (
            isinstance(out, torch.Tensor)
            and tuple(out.shape) == (1, 6, 1, 1)
            and h == [0.0, 0.0, 0.0, 1.0, 1.0, 1.0]
            and torch.equal(out[:, ::3], kv)
        ),
        "kv heads repeated contiguously: [0, 0, 0, 1, 1, 1] of shape (1, 6, 1, 1) for heads [0, 1], n_rep=3",
    )


# Verdicts per (class, its forward, its modeling module's repeat_kv, window, config class, layer type, own
# parameter names): one probe per kind of layer of a class (a sliding layer with sinks and a full one without
# them, as in MiMo-V2-Flash, are probed apart).
_VERDICTS: dict[tuple[Any, ...], tuple[str, str | None, RuntimeError | None]] = {}


def _verdict(module: torch.nn.Module, params: AttnParams) -> tuple[str, str | None, RuntimeError | None]:
    """("", sinks, None) when the forward hands the kernel what it needs (`sinks`: the name of the parameter it
    passes as `s_aux`, or None), (why not, None, None) when it keeps SDPA, or ("", None, error) when a private
    contract it relies on broke."""
    cls = type(module)
    source = sys.modules.get(cls.__module__)
    repeat_kv = vars(source).get("repeat_kv") if source is not None else None
    key = (
        cls,
        getattr(cls, "forward", None),
        repeat_kv,
        params.window_size,
        type(getattr(module, "config", None)),
        layer_type_of(module),
        tuple(name for name, _ in module.named_parameters(recurse=False)),
    )
    verdict = _VERDICTS.get(key)
    if verdict is None:
        try:
            skip, sinks = check_dispatch(module, params)
            if not skip and repeat_kv is not None:
                _repeat_kv_contract(repeat_kv, f"{cls.__module__}.repeat_kv")
            verdict = (skip, sinks, None)
        except RuntimeError as exc:
            verdict = ("", None, exc)
        _VERDICTS[key] = verdict
    return verdict


def sinks_reason(cls: Any) -> str:
    """ "" when the kernel class takes learnable sinks (TE's ``softmax_type="learnable"``), else why not."""
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        return f"sinks: the signature of {cls!r} cannot be read, so learnable sinks cannot be asked for"
    if "softmax_type" in parameters:
        return ""
    return (
        f"sinks: {getattr(cls, '__qualname__', cls)} takes no softmax_type, so it cannot add learnable sinks"
    )


def decide(module: torch.nn.Module, kernel_cls: Any = None) -> Decision:
    """Layout first (pure), then the forward's behaviour (probed once per class), then whether the kernel
    class (`kernel_cls`, default: `default_dot_product_attention_cls()`) takes the sinks the layer has."""
    params, reason = check_attention_module(module)
    if params is None:
        return Decision(None, reason)
    skip, sinks, error = _verdict(module, params)
    if sinks is None:
        return Decision(params, skip, error)
    params = dataclasses.replace(params, sinks=sinks)
    cls = default_dot_product_attention_cls() if kernel_cls is None else kernel_cls
    return Decision(params, skip or sinks_reason(cls), error)


def _taken_reason(module: torch.nn.Module, params: AttnParams) -> str:
    if params.window_size[0] >= 0:
        reason = f"causal, sliding window {params.window_size[0] + 1}"
    else:
        reason = "causal" if getattr(module, "is_causal", True) else "no_mask"
    return f"{reason}, learnable sinks ({params.sinks})" if params.sinks else reason


def plan_te_attention(
    model: torch.nn.Module, *, dot_product_attention_cls: Callable[..., torch.nn.Module] | None = None
) -> list[tuple[str, bool, str]]:
    """For each attention-like module: `(name, taken, reason)`; pure (the model is not changed).

    `dot_product_attention_cls` is the kernel class `inject_te_attention` would get (it decides whether
    layers with learnable sinks can be taken); default: transformer-engine's, else the SDPA reference.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {model!r}")
    if dot_product_attention_cls is not None and not callable(dot_product_attention_cls):
        raise TypeError(
            f"dot_product_attention_cls must be a class or callable, got {dot_product_attention_cls!r}"
        )
    plan: list[tuple[str, bool, str]] = []
    for name, module in model.named_modules():
        if not is_candidate(module):
            continue
        if is_injected(module):
            plan.append((name, True, "injected"))
            continue
        if has_foreign_kernel(module):
            plan.append((name, False, f"already has {KERNEL_ATTR}"))
            continue
        decision = decide(module, dot_product_attention_cls)
        if decision.params is None:
            plan.append((name, False, decision.reason))
        elif decision.error is not None:  # raised by inject_te_attention when nothing else can be taken
            plan.append((name, False, f"refused: {decision.error}"))
        elif decision.reason:
            plan.append((name, False, decision.reason))
        else:
            plan.append((name, True, _taken_reason(module, decision.params)))
    return plan
