"""The patches of one module: RMSNorm, gated MLP and the attention's rope, each checked before it is built.

Every replacement is a fresh function of `self` bound to its module with `types.MethodType` (see `bound`),
written into the instance `__dict__` by a `Patch`; `_get_name` is rebound alongside so `print(model)` shows it.
"""

from __future__ import annotations

import functools
import inspect
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._contract import contract_error
from ._patch import MISSING, Patch, mark, patch_name
from ._repr import short_repr
from .liger_forwards import LigerOps, gated_mlp_forward, liger_rope, method_function, rms_norm_forward
from .liger_plans import LigerPlan
from .liger_rope import checked_rope_target
from .rebind import with_global
from .signature import assert_same_signature, with_self

NAMES = {
    "rms_norm": "am_kernels.liger.rms_norm",
    "swiglu": "am_kernels.liger.swiglu",
    "geglu": "am_kernels.liger.geglu",
    "rope": "am_kernels.liger.rope",
    "fused_linear_cross_entropy": "am_kernels.liger.fused_linear_cross_entropy",
    "cross_entropy": "am_kernels.liger.cross_entropy",
}
_SHOWN_AS = {"rms_norm": "LigerRMSNorm", "swiglu": "LigerSwiGLUMLP", "geglu": "LigerGEGLUMLP"}


def bound(func: Callable[..., Any], module: Any, name: str, original: Any) -> types.MethodType:
    """`func(self, ...)` bound to `module`, marked, showing the original's name, doc and signature.

    Bound with `types.MethodType`, never closed over `module`: `copy.deepcopy` rebinds a bound
    method to the copied module (`copy._deepcopy_method`), so a deep copy (a pipeline stage)
    computes with its own weights. `func` must be a fresh function per call when `original` is
    given, since the original's metadata are set on it. The metadata come from the original's
    function when the original is a method of `module` (the same for every copy); a foreign
    callable instead gets an explicit `__signature__`. Only a plain function's `__dict__` is merged into `func`
    (never another wrapper's state). `original=None` keeps `func`'s own metadata (the rope
    forward copy, which already is the class function and is shared by the modules of one class).
    """
    if original is None:
        return types.MethodType(mark(func, name), module)
    function = method_function(original, module)
    wrapped = original if function is None else function
    merge = functools.WRAPPER_UPDATES if isinstance(wrapped, types.FunctionType) else ()
    functools.update_wrapper(func, wrapped, updated=merge)
    if function is None:
        func.__signature__ = with_self(inspect.signature(original))  # type: ignore[attr-defined]
    return types.MethodType(mark(func, name), module)


def name_patch(module: Any, shown_as: str, name: str) -> Patch:
    def _get_name(self: Any) -> str:
        return shown_as

    return Patch(module, "_get_name", bound(_get_name, module, name, module._get_name))


def forward_patch(module: Any, func: Callable[..., Any], name: str, *, wrap: bool = True) -> Patch:
    original = module.forward
    replacement = bound(func, module, name, original if wrap else None)
    assert_same_signature(original, replacement)
    return Patch(module, "forward", replacement)


def describe_owner(value: Any) -> str:
    """What an instance-level forward is: the am-* patch that owns it, or its repr."""
    marker = patch_name(value)
    if isinstance(marker, str):
        return f"the {marker.split('.')[0]} patch {marker!r}"
    return f"a foreign wrapper ({short_repr(value)})"


def refuse_instance_forward(module: Any, path: str, kernel: str, flag: str) -> None:
    """A kernel that replaces the whole forward would silently drop an instance-level forward: refuse."""
    own = vars(module).get("forward")
    # the class's own forward bound to the module (what a pickled Liger patch loads as) drops nothing
    if own is not None and method_function(own, module) is not type(module).forward:
        raise ValueError(
            f"{path or '<root>'} ({type(module).__name__}).forward is already replaced on the instance by "
            f"{describe_owner(own)}; Liger's {kernel} replaces the whole forward, so that patch would stop "
            f"running: undo it first (or patch Liger first), or pass {flag}=False"
        )


def _check_one_input(original: Any, what: str) -> None:
    params = list(inspect.signature(original).parameters.values())
    if len(params) != 1 or params[0].kind not in (
        inspect.Parameter.POSITIONAL_ONLY,
        inspect.Parameter.POSITIONAL_OR_KEYWORD,
    ):
        raise contract_error(
            what, f"expected a forward with one tensor input, found {inspect.signature(original)}"
        )


# Where transformers' RMSNorms keep their epsilon (Llama4's moved from `eps` to `variance_epsilon` in 5.25).
_EPS_ATTRS = ("variance_epsilon", "eps")


def norm_eps_attr(module: Any, what: str) -> str:
    """The one epsilon attribute the norm has (two with different values would leave us guessing)."""
    found = {
        name: getattr(module, name) for name in _EPS_ATTRS if isinstance(getattr(module, name, None), float)
    }
    if not found or len(set(found.values())) > 1:
        raise contract_error(
            what, f"expected one float epsilon attribute among {_EPS_ATTRS}, found {found or 'none'}"
        )
    return next(iter(found))


def check_norm_math(module: Any, eps_attr: str, offset: float, what: str) -> None:
    """The norm's class forward must compute x / sqrt(mean(x^2) + eps) * (offset + weight), eps from `eps_attr`.

    Run on a stand-in of the module that differs only by its weight (seeded values, on the CPU when the
    model is on the meta device), called directly so no hook runs. The first probe row has
    mean(x^2) == eps, where a norm using another epsilon (or none) is off by far more than rounding.
    """
    dtype, device = module.weight.dtype, module.weight.device
    device = torch.device("cpu") if device.type == "meta" else device
    generator = torch.Generator().manual_seed(0)
    width = module.weight.shape[-1]
    weight = torch.rand(width, generator=generator).add(0.5).to(device, dtype)
    eps = getattr(module, eps_attr)
    rows = torch.stack(
        (torch.full((width,), eps**0.5 if eps > 0 else 1.0), torch.randn(width, generator=generator))
    )
    stand_in = object.__new__(type(module))
    stand_in.__dict__.update(vars(module), _parameters=dict(module._parameters))
    vars(stand_in).pop("weight", None)  # a weight kept as a plain attribute would shadow the Parameter
    stand_in.weight = nn.Parameter(weight, requires_grad=False)
    x = rows.to(device, dtype).unsqueeze(0)
    try:
        with torch.no_grad():
            got = type(module).forward(stand_in, x)
    except Exception as exc:
        raise contract_error(what, f"a probe call failed ({exc!r})") from exc
    x32 = x.float()
    expected = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * (offset + weight.float())
    # a few ulps of the module's dtype: the wrong-epsilon row is off by more than 20%
    tol = max(4 * torch.finfo(dtype).eps, 1e-5)
    if not (
        isinstance(got, torch.Tensor)
        and got.shape == expected.shape
        and torch.allclose(got.float(), expected, rtol=tol, atol=tol)
    ):
        raise contract_error(
            what,
            f"on a probe input it does not compute x / sqrt(mean(x^2) + eps) * ({offset:g} + weight) "
            f"with eps = module.{eps_attr}, which Liger's RMSNorm computes",
        )


def norm_patches(module: Any, path: str, plan: LigerPlan, ops: LigerOps) -> list[Patch]:
    refuse_instance_forward(module, path, "RMSNorm", "rms_norm")
    what = f"{type(module).__module__}.{plan.norm_class}.forward"
    _check_one_input(module.forward, what)
    if getattr(module, "weight", None) is None:
        raise contract_error(what, "the module has no weight parameter")
    eps_attr = norm_eps_attr(module, what)
    check_norm_math(module, eps_attr, plan.norm_offset, what)
    func = rms_norm_forward(
        module.forward,
        ops,
        eps_attr=eps_attr,
        offset=plan.norm_offset,
        casting_mode=plan.norm_casting_mode,
        in_place=plan.norm_in_place,
    )
    return [
        forward_patch(module, func, NAMES["rms_norm"]),
        name_patch(module, _SHOWN_AS["rms_norm"], NAMES["rms_norm"]),
    ]


def mlp_patches(module: Any, path: str, plan: LigerPlan, ops: LigerOps, config: Any) -> list[Patch]:
    refuse_instance_forward(module, path, f"{plan.mlp_kind} MLP", "swiglu")
    what = f"{type(module).__module__}.{plan.mlp_class}.forward"
    _check_one_input(module.forward, what)
    projections = (
        ("gate_up_proj", "down_proj")
        if plan.mlp_layout == "fused_gate_up"
        else ("gate_proj", "up_proj", "down_proj")
    )
    for proj in projections:
        if not hasattr(module, proj):
            raise contract_error(what, f"the module has no {proj}")
    act = getattr(config, plan.mlp_act_attr, MISSING)
    if act not in plan.mlp_acts:
        raise ValueError(
            f"Liger's {plan.mlp_kind} kernel computes {plan.mlp_acts}, but config.{plan.mlp_act_attr} is {act!r}; "
            "pass swiglu=False to keep this model's MLP"
        )
    func = gated_mlp_forward(module.forward, ops, kind=plan.mlp_kind, layout=plan.mlp_layout)
    name = NAMES[plan.mlp_kind]
    return [forward_patch(module, func, name), name_patch(module, _SHOWN_AS[plan.mlp_kind], name)]


class RopeCopies:
    """One Liger rope and one rebound forward per attention class, shared by every module of one patch.

    Sharing the copy shares its code object, hence torch.compile's cache: every layer reuses the frames
    compiled for the first one instead of recompiling (see `rebind.with_global`).
    """

    def __init__(self, ops: LigerOps, plan: LigerPlan) -> None:
        self.plan = plan
        self.rope: Callable[..., Any] | None = None
        self.ops = ops
        self.forwards: dict[Any, types.FunctionType] = {}

    def forward_for(self, module: Any) -> types.FunctionType | None:
        """The rebound forward for `module`, or None for a NoPE layer of a plan with `rope_optional`."""
        target = checked_rope_target(module, self.plan, optional=self.plan.rope_optional)
        if target is None:
            return None
        cls_forward, hf_rope, what = target
        if cls_forward not in self.forwards:
            if self.rope is None:
                self.rope = mark(liger_rope(self.ops), NAMES["rope"], wrapped=hf_rope)
            self.forwards[cls_forward] = with_global(cls_forward, self.plan.rope_function, self.rope, what)
        return self.forwards[cls_forward]


def rope_patches(module: Any, path: str, copies: RopeCopies) -> list[Patch]:
    refuse_instance_forward(module, path, "rope (a copy of the class forward)", "rope")
    func = copies.forward_for(module)
    if func is None:
        return []  # this layer applies no rotary embedding: nothing to replace
    name = NAMES["rope"]
    shown_as = f"{type(module).__name__}+LigerRope"
    return [forward_patch(module, func, name, wrap=False), name_patch(module, shown_as, name)]
