"""Apply Liger's kernels to one model instance, all-or-nothing and reversibly.

Every replacement is written into a module instance's own `__dict__` through a `Patch`:
no class, no transformers module attribute and no torch function is changed, so other
models (and other threads) are unaffected. Rotary embeddings are the one place where
transformers calls a module-level function (`apply_rotary_pos_emb`); instead of swapping it
in the modeling module, each attention instance gets a copy of its class's forward whose
global lookup of that one name resolves to Liger's rope (see `rebind.with_global`).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from typing import Any, TypeVar

from ._contract import contract_error, parameter_name, require_parameters
from ._patch import MISSING, Patch, PatchSet, mark
from .liger_forwards import (
    CAUSAL_LM_PARAMETERS,
    LigerOps,
    cross_entropy_loss,
    fused_linear_ce_forward,
    gated_mlp_forward,
    liger_rope,
    load_liger_ops,
    rms_norm_forward,
)
from .liger_plans import LIGER_PLANS, LigerPlan, supported_model_types
from .liger_rope import checked_rope_target
from .rebind import with_global
from .signature import assert_same_signature

M = TypeVar("M")

HANDLE_ATTR = "_am_liger_kernel"
_NAMES = {
    "rms_norm": "am_kernels.liger.rms_norm",
    "swiglu": "am_kernels.liger.swiglu",
    "geglu": "am_kernels.liger.geglu",
    "rope": "am_kernels.liger.rope",
    "fused_linear_cross_entropy": "am_kernels.liger.fused_linear_cross_entropy",
    "cross_entropy": "am_kernels.liger.cross_entropy",
}
_SHOWN_AS = {"rms_norm": "LigerRMSNorm", "swiglu": "LigerSwiGLUMLP", "geglu": "LigerGEGLUMLP"}


class LigerKernelPatch:
    """The applied patches of one model, kept on the model so that unpatching needs no registry."""

    def __init__(self, options: dict[str, bool], model_type: str, patches: PatchSet) -> None:
        self.options = options
        self.model_type = model_type
        self.patches = patches

    def __repr__(self) -> str:
        return f"LigerKernelPatch({self.model_type!r}, {self.options}, {len(self.patches)} patches)"

    def revert(self) -> None:
        # Check every patch first so that a foreign patch on one module never leaves a half-reverted model.
        covered = [p.describe() for p in self.patches if p.applied and not p.is_live()]
        if covered:
            raise RuntimeError(
                f"cannot unpatch Liger kernels: something else was patched over {covered}; revert that first"
            )
        self.patches.revert()


def _resolve_plan(model: Any) -> tuple[str, LigerPlan]:
    config = getattr(model, "config", None)
    if config is None:
        raise TypeError(
            f"patch_liger_kernel needs a transformers model with .config, got {type(model).__name__}"
        )
    model_type = getattr(config, "model_type", None)
    if model_type in LIGER_PLANS:
        return model_type, LIGER_PLANS[model_type]
    # Vision-language models: patch their language model when its type is supported.
    text_config = getattr(config, "text_config", None)
    text_type = getattr(text_config, "model_type", None) if text_config is not None else None
    if text_type in LIGER_PLANS:
        return text_type, LIGER_PLANS[text_type]
    shown = model_type if text_type is None else f"{model_type} (text_config: {text_type})"
    raise ValueError(
        f"patch_liger_kernel does not support model_type {shown!r}; supported: {', '.join(supported_model_types())}"
    )


def _bound(func: Callable[..., Any], module: Any, name: str, original: Any) -> types.MethodType:
    """`func(self, ...)` bound to `module`, marked, showing the original's name, doc and signature.

    Bound with `types.MethodType`, never closed over `module`: `copy.deepcopy` rebinds a bound
    method to the copied module (`copy._deepcopy_method`), so a deep copy (a pipeline stage)
    computes with its own weights. `func` must be a fresh function per call, since its marker
    and metadata are set on it. The metadata come from the original's function when the
    original is a method of `module` (the same for every copy); a foreign callable instead
    gets an explicit `__signature__`. `original=None` keeps `func`'s own metadata (the rope
    forward copy, which already is the class function).
    """
    if original is None:
        return types.MethodType(mark(func, name), module)
    own_method = isinstance(original, types.MethodType) and original.__self__ is module
    mark(func, name, wrapped=original.__func__ if own_method else original)
    if not own_method:
        # `self` is positional-only so it stays valid before any parameter kind; binding drops it.
        sig = inspect.signature(original)
        bound_self = inspect.Parameter("_am_self", inspect.Parameter.POSITIONAL_ONLY)
        func.__signature__ = sig.replace(parameters=[bound_self, *sig.parameters.values()])  # type: ignore[attr-defined]
    return types.MethodType(func, module)


def _name_patch(module: Any, shown_as: str, name: str) -> Patch:
    def _get_name(self: Any) -> str:
        return shown_as

    return Patch(module, "_get_name", _bound(_get_name, module, name, module._get_name))


def _check_one_input(original: Any, what: str) -> None:
    params = list(inspect.signature(original).parameters.values())
    if len(params) != 1 or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise contract_error(
            what, f"expected a forward with one tensor input, found {inspect.signature(original)}"
        )


def _forward_patch(module: Any, func: Callable[..., Any], name: str, *, wrap: bool = True) -> Patch:
    original = module.forward
    replacement = _bound(func, module, name, original if wrap else None)
    assert_same_signature(original, replacement)
    return Patch(module, "forward", replacement)


def _norm_patches(module: Any, plan: LigerPlan, ops: LigerOps) -> list[Patch]:
    what = f"{type(module).__module__}.{plan.norm_class}.forward"
    _check_one_input(module.forward, what)
    if not hasattr(module, plan.norm_eps_attr):
        raise contract_error(what, f"the module has no epsilon attribute {plan.norm_eps_attr!r}")
    if getattr(module, "weight", None) is None:
        raise contract_error(what, "the module has no weight parameter")
    func = rms_norm_forward(
        module.forward,
        ops,
        eps_attr=plan.norm_eps_attr,
        offset=plan.norm_offset,
        casting_mode=plan.norm_casting_mode,
        in_place=plan.norm_in_place,
    )
    return [
        _forward_patch(module, func, _NAMES["rms_norm"]),
        _name_patch(module, _SHOWN_AS["rms_norm"], _NAMES["rms_norm"]),
    ]


def _mlp_patches(module: Any, plan: LigerPlan, ops: LigerOps, config: Any) -> list[Patch]:
    what = f"{type(module).__module__}.{plan.mlp_class}.forward"
    _check_one_input(module.forward, what)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        if not hasattr(module, proj):
            raise contract_error(what, f"the module has no {proj}")
    act = getattr(config, plan.mlp_act_attr, MISSING)
    if act not in plan.mlp_acts:
        raise ValueError(
            f"Liger's {plan.mlp_kind} kernel computes {plan.mlp_acts}, but config.{plan.mlp_act_attr} is {act!r}; "
            "pass swiglu=False to keep this model's MLP"
        )
    func = gated_mlp_forward(module.forward, ops, kind=plan.mlp_kind)
    name = _NAMES[plan.mlp_kind]
    return [_forward_patch(module, func, name), _name_patch(module, _SHOWN_AS[plan.mlp_kind], name)]


def _rope_patches(module: Any, plan: LigerPlan, ops: LigerOps) -> list[Patch]:
    cls_forward, hf_rope, what = checked_rope_target(module, plan)
    rope = mark(liger_rope(ops), _NAMES["rope"], wrapped=hf_rope)
    func = with_global(cls_forward, plan.rope_function, rope, what)
    name = _NAMES["rope"]
    shown_as = f"{type(module).__name__}+LigerRope"
    return [_forward_patch(module, func, name, wrap=False), _name_patch(module, shown_as, name)]


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


def _causal_lm_patches(model: Any, plan: LigerPlan, ops: LigerOps, *, fused: bool) -> list[Patch]:
    what = f"{type(model).__module__}.{plan.causal_lm_class}.forward"
    lm_head = getattr(model, "lm_head", None)
    if fused:
        sig = require_parameters(model.forward, (), what)
        # The fused path reads these by name, so **kwargs alone does not satisfy the contract.
        missing = [name for name in CAUSAL_LM_PARAMETERS if name not in sig.parameters]
        if missing or not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            raise contract_error(
                what, f"expected parameters {list(CAUSAL_LM_PARAMETERS)} and **kwargs in {sig}"
            )
        if lm_head is None or getattr(lm_head, "bias", None) is not None:
            raise contract_error(what, "fused linear cross entropy needs a bias-free lm_head")
        if not hasattr(model, model.base_model_prefix):
            raise contract_error(what, f"the base model attribute {model.base_model_prefix!r} is missing")
        cache_fields = (
            _base_output_cache_field(getattr(model, model.base_model_prefix)),
            _causal_lm_output_cache_field(),
        )
        func = fused_linear_ce_forward(
            model.forward, model, ops, softcap_attr=plan.softcap_attr, cache_fields=cache_fields
        )
        name = _NAMES["fused_linear_cross_entropy"]
        return [
            _forward_patch(model, func, name),
            _name_patch(model, f"{type(model).__name__}+LigerFusedLinearCrossEntropy", name),
        ]
    if plan.softcap_attr is not None and getattr(model.config, plan.softcap_attr, None) is not None:
        raise ValueError(
            f"cross_entropy=True is not exact for {type(model).__name__}: its logits are soft-capped "
            f"(config.{plan.softcap_attr}); use fused_linear_cross_entropy=True"
        )
    _check_loss_function_property(model)
    name = _NAMES["cross_entropy"]
    loss = mark(cross_entropy_loss(ops), name)
    # `loss_function` is a property reading `self._loss_function` first: a per-instance override.
    return [
        Patch(model, "_loss_function", loss),
        _name_patch(model, f"{type(model).__name__}+LigerCrossEntropy", name),
    ]


def _language_config(model: Any, model_type: str) -> Any:
    config = model.config
    return config if config.model_type == model_type else config.text_config


def patch_liger_kernel(
    model: M,
    *,
    rope: bool = True,
    rms_norm: bool = True,
    swiglu: bool = True,
    cross_entropy: bool = False,
    fused_linear_cross_entropy: bool = True,
    ops: LigerOps | None = None,
) -> M:
    """Replace `model`'s RMSNorm, gated MLP, rotary embedding and loss with Liger's kernels; returns `model`.

    Only this instance changes (its submodules' `forward`/`_get_name` and, for the loss, its
    own `forward` or `_loss_function`); `unpatch_liger_kernel(model)` restores everything.
    The plan is chosen by `config.model_type` (or `config.text_config.model_type` for VLMs)
    from `LIGER_PLANS`; `swiglu` covers the architecture's gated MLP (GEGLU for Gemma3). The
    fused loss runs only in training mode with labels; eval keeps transformers' forward.
    `ops` replaces the kernel source (default: liger-kernel). Nothing is changed if any step fails.
    """
    options = {
        "rope": rope,
        "rms_norm": rms_norm,
        "swiglu": swiglu,
        "cross_entropy": cross_entropy,
        "fused_linear_cross_entropy": fused_linear_cross_entropy,
    }
    for key, value in options.items():
        if not isinstance(value, bool):
            raise TypeError(f"{key} must be a bool, got {value!r}")
    if cross_entropy and fused_linear_cross_entropy:
        raise ValueError(
            "cross_entropy and fused_linear_cross_entropy are exclusive; set one of them to False"
        )
    model_type, plan = _resolve_plan(model)
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
    config = _language_config(model, model_type)

    patches = PatchSet(name="am_kernels.liger_kernel")
    found = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    for _, module in model.named_modules():
        cls_name = type(module).__name__
        if rms_norm and cls_name == plan.norm_class:
            patches.patches.extend(_norm_patches(module, plan, ops))
            found["rms_norm"] += 1
        elif swiglu and cls_name == plan.mlp_class:
            patches.patches.extend(_mlp_patches(module, plan, ops, config))
            found["swiglu"] += 1
        elif rope and cls_name == plan.attention_class:
            patches.patches.extend(_rope_patches(module, plan, ops))
            found["rope"] += 1
    expected = {"rms_norm": plan.norm_class, "swiglu": plan.mlp_class, "rope": plan.attention_class}
    for key, count in found.items():
        if options[key] and count == 0:
            raise contract_error(
                f"patch_liger_kernel({model_type})",
                f"no {expected[key]} module found in {type(model).__name__}",
            )
    if cross_entropy or fused_linear_cross_entropy:
        if type(model).__name__ != plan.causal_lm_class:
            kind = "fused_linear_cross_entropy" if fused_linear_cross_entropy else "cross_entropy"
            raise ValueError(
                f"{kind}=True patches the {plan.causal_lm_class} head, but the model is {type(model).__name__}; "
                f"pass {kind}=False"
            )
        patches.patches.extend(_causal_lm_patches(model, plan, ops, fused=fused_linear_cross_entropy))

    handle = LigerKernelPatch(options, model_type, patches)
    # First in the set, so it is reverted last; the handle carries the undo with the model.
    patches.patches.insert(0, Patch(model, HANDLE_ATTR, handle))
    patches.apply()
    return model


def get_liger_kernel_patch(model: Any) -> LigerKernelPatch | None:
    """The handle of `patch_liger_kernel(model)`, or None when the model is not patched."""
    handle = vars(model).get(HANDLE_ATTR)
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
