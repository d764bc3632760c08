"""Inject a DotProductAttention kernel into every compatible attention module of a HF model, and undo it.

`inject_te_attention(model)` (1) registers the "te" backend in transformers' attention
registries, (2) gives each compatible attention module (layout read off the module, dispatch
probed by calling its forward, see `te_probe`) its kernel (`module.attn_module`, kept
out of `state_dict` and `parameters()` because it is stored in the instance dict, not as a
submodule) and its parameters, (3) points the configs of those modules at `attn_implementation="te"`
and (4) sets `model._te_attention_injected`. Every step is a `Patch`; `remove_te_attention(model)`
or the returned handle's `revert()` restores the model exactly. `plan_te_attention(model)` reports
the same decisions without changing anything.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import te_backend
from ._contract import contract_error, require_parameters, require_result
from ._patch import Patch, PatchSet
from .te_backend import KERNEL_ATTR, PARAMS_ATTR, TE_ATTN_IMPLEMENTATION
from .te_params import AttnParams, check_attention_module
from .te_probe import CONFIG_ATTR, check_dispatch, selecting_config

__all__ = [
    "TEAttentionHandle",
    "default_dot_product_attention_cls",
    "inject_te_attention",
    "inject_te_attention_into_module",
    "plan_te_attention",
    "remove_te_attention",
]

logger = logging.getLogger(__name__)

MODEL_FLAG = "_te_attention_injected"


class _InstanceDictPatch(Patch):
    """Writes into the instance `__dict__` directly, so nn.Module does not register a submodule."""

    def _set(self, value: Any) -> None:
        vars(self.target)[self.attr] = value

    def _delete(self) -> None:
        del vars(self.target)[self.attr]


class TEAttentionHandle(PatchSet):
    """The patches of one injection; `revert()` (or leaving the `with` block) undoes them."""

    def __init__(self, model: torch.nn.Module, patches: list[Patch], taken: list[str]) -> None:
        super().__init__(patches, name="te_attention")
        self.model_ref = weakref.ref(model)
        self.taken = taken  # module names that run the kernel

    def revert(self) -> None:
        # Refuse before touching anything when a foreign patch sits on ours, so a retry can succeed.
        for patch in self.patches:
            patch.check_revertible()
        model = self.model_ref()
        if model is not None:
            _MODEL_HANDLES.pop(model, None)
            for module in model.modules():
                handle = _MODULE_HANDLES.pop(module, None)
                if handle is not None:
                    handle.revert()
        super().revert()
        if not any(h.applied for h in _MODEL_HANDLES.values()) and _registered_by_injection[0]:
            te_backend.unregister_te_attention_backend()
            _registered_by_injection[0] = False


_MODEL_HANDLES: weakref.WeakKeyDictionary[torch.nn.Module, TEAttentionHandle] = weakref.WeakKeyDictionary()
_MODULE_HANDLES: weakref.WeakKeyDictionary[torch.nn.Module, PatchSet] = weakref.WeakKeyDictionary()
_registered_by_injection = [False]


def default_dot_product_attention_cls() -> Callable[..., torch.nn.Module]:
    """transformer_engine.pytorch.DotProductAttention when transformer-engine is installed, else the reference."""
    if importlib.util.find_spec("transformer_engine") is not None:
        import transformer_engine.pytorch as te  # the [te] extra; import errors propagate

        return te.DotProductAttention
    from .reference import ReferenceDotProductAttention

    logger.info("transformer-engine is not installed; using the SDPA reference DotProductAttention")
    return ReferenceDotProductAttention


def _is_candidate(module: torch.nn.Module) -> bool:
    if any(isinstance(getattr(module, n, None), torch.nn.Module) for n in ("q_proj", "k_proj", "v_proj")):
        return True
    return type(module).__name__.endswith("Attention") and any(True for _ in module.children())


def plan_te_attention(model: torch.nn.Module) -> list[tuple[str, bool, str]]:
    """For each attention-like module: `(name, taken, reason)`; pure (the model is not changed)."""
    plan: list[tuple[str, bool, str]] = []
    for name, module in model.named_modules():
        if not _is_candidate(module):
            continue
        if KERNEL_ATTR in vars(module) or KERNEL_ATTR in module._modules:
            injected = isinstance(vars(module).get(PARAMS_ATTR), AttnParams)
            plan.append((name, injected, "injected" if injected else f"already has {KERNEL_ATTR}"))
            continue
        params, reason = check_attention_module(module)
        if params is None:
            plan.append((name, False, reason))
            continue
        try:
            skip = _dispatch_verdict(module, params)
        except RuntimeError as exc:  # inject_te_attention raises this before changing anything
            plan.append((name, False, f"refused: {exc}"))
            continue
        if skip:
            plan.append((name, False, skip))
        elif params.window_size[0] >= 0:
            plan.append((name, True, f"causal, sliding window {params.window_size[0] + 1}"))
        else:
            plan.append((name, True, "causal" if getattr(module, "is_causal", True) else "no_mask"))
    return plan


def _make_kernel(cls: Callable[..., torch.nn.Module], params: AttnParams) -> torch.nn.Module:
    # Built without dropout: a call that asks for dropout falls back to SDPA (counted), which keeps
    # the kernel's numerics independent of its own train/eval flag (it is not a registered submodule).
    return cls(
        num_attention_heads=params.num_heads,
        kv_channels=params.head_dim,
        num_gqa_groups=params.num_kv_heads,
        attention_dropout=0.0,
        qkv_format="bshd",
        attn_mask_type="causal",
        window_size=params.window_size,
        softmax_scale=params.softmax_scale,
    )


def inject_te_attention_into_module(
    module: torch.nn.Module,
    *,
    dot_product_attention_cls: Callable[..., torch.nn.Module] | None = None,
) -> bool:
    """Give one HF attention module its kernel; True on success, False when it cannot take it.

    False silently when its layout does not fit, with a warning when its forward does not dispatch
    through the attention interface (probed); raises before any change when the forward dispatches
    but drops what the kernel path needs (see `te_probe.check_dispatch`).

    The module runs the kernel once its config selects `attn_implementation="te"`, which
    `inject_te_attention(model)` does; undone by `remove_te_attention` on any model containing it.
    """
    if module in _MODULE_HANDLES and _MODULE_HANDLES[module].applied:
        return True
    if KERNEL_ATTR in vars(module) or KERNEL_ATTR in module._modules:
        return False
    params, _ = check_attention_module(module)
    if params is None:
        return False
    skip = _dispatch_verdict(module, params)
    if skip:
        warnings.warn(f"TE attention skips {type(module).__name__}: {skip}", UserWarning, stacklevel=2)
        return False
    cls = dot_product_attention_cls or default_dot_product_attention_cls()
    kernel = _make_kernel(cls, params)
    patches = PatchSet(
        [_InstanceDictPatch(module, KERNEL_ATTR, kernel), _InstanceDictPatch(module, PARAMS_ATTR, params)],
        name=f"te_attention[{type(module).__name__}]",
    )
    patches.apply()
    _MODULE_HANDLES[module] = patches
    return True


def _config_contract(config: Any) -> Callable[[Any], None]:
    def check(_live: Any) -> None:
        # Writing the stored field must select the backend the modeling code reads; checked on a copy.
        selecting_config(config, TE_ATTN_IMPLEMENTATION)

    return check


# Verdicts of `check_dispatch` + the repeat_kv contract that did not raise ("" = takes the kernel, else why
# not), per (class, its forward, its modeling module's repeat_kv, window, config class): one probe per class.
_VERDICTS: dict[tuple[Any, ...], str] = {}


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


def _dispatch_verdict(module: torch.nn.Module, params: AttnParams) -> str:
    """Empty when the module can take the kernel, else why it keeps SDPA; raises when a contract it relies on broke.

    Its forward must pass ``**kwargs`` (position_ids, cu_seq_lens_*) and, on windowed layers,
    ``sliding_window`` to the attention interface (a behaviour probe, see `te_probe`); its modeling
    module's ``repeat_kv`` must keep the layout the kernel path undoes.
    """
    cls = type(module)
    source = sys.modules.get(cls.__module__)
    repeat_kv = vars(source).get("repeat_kv") if source is not None else None
    key = (
        cls,
        getattr(cls, "forward", None),
        repeat_kv,
        params.window_size,
        type(getattr(module, "config", None)),
    )
    verdict = _VERDICTS.get(key)
    if verdict is None:
        verdict = check_dispatch(module, params)
        if not verdict and repeat_kv is not None:
            _repeat_kv_contract(repeat_kv, f"{cls.__module__}.repeat_kv")
        _VERDICTS[key] = verdict
    return verdict


def _preflight(model: torch.nn.Module) -> None:
    """Every module and config contract of an injection, run before its first setattr."""
    configs: dict[int, Any] = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if not _is_candidate(module) or config is None:
            continue
        if KERNEL_ATTR in vars(module) or KERNEL_ATTR in module._modules:
            continue  # injected already, or not ours to inject
        params, _ = check_attention_module(module)
        if params is None or _dispatch_verdict(module, params):
            continue  # keeps SDPA
        configs.setdefault(id(config), config)
    for config in configs.values():
        _config_contract(config)(None)


def inject_te_attention(
    model: torch.nn.Module,
    *,
    dot_product_attention_cls: Callable[..., torch.nn.Module] | None = None,
) -> TEAttentionHandle:
    """Inject the kernel into all compatible attention modules; a second call returns the first handle.

    Call after weights are loaded and before FSDP wrapping. Modules that cannot take the kernel keep
    transformers' SDPA; `plan_te_attention(model)` says which and why.
    """
    existing = _MODEL_HANDLES.get(model)
    if existing is not None and existing.applied:
        return existing
    if vars(model).get(MODEL_FLAG):
        raise RuntimeError(
            f"{type(model).__name__} is flagged {MODEL_FLAG} but this process holds no handle for it"
        )
    cls = dot_product_attention_cls or default_dot_product_attention_cls()
    _preflight(model)
    if not te_backend.is_te_attention_backend_registered():
        te_backend.register_te_attention_backend()
        _registered_by_injection[0] = True
    taken: list[str] = []
    configs: dict[int, Any] = {}
    try:
        for name, module in model.named_modules():
            if not _is_candidate(module) or getattr(module, "config", None) is None:
                continue
            if inject_te_attention_into_module(module, dot_product_attention_cls=cls):
                taken.append(name)
                configs.setdefault(id(module.config), module.config)
        patches: list[Patch] = [
            Patch(config, CONFIG_ATTR, TE_ATTN_IMPLEMENTATION, contract=_config_contract(config))
            for config in configs.values()
            if vars(config).get(CONFIG_ATTR) != TE_ATTN_IMPLEMENTATION
        ]
        if taken:
            patches.append(Patch(model, MODEL_FLAG, True))
        handle = TEAttentionHandle(model, patches, taken)
        handle.apply()
    except BaseException:
        for module in model.modules():
            module_handle = _MODULE_HANDLES.pop(module, None)
            if module_handle is not None:
                module_handle.revert()
        raise
    _MODEL_HANDLES[model] = handle
    logger.info("TE attention injected into %d modules of %s", len(taken), type(model).__name__)
    return handle


def remove_te_attention(model: torch.nn.Module) -> bool:
    """Undo `inject_te_attention` (and module-level injections inside `model`); False when nothing was injected."""
    handle = _MODEL_HANDLES.get(model)
    if handle is not None:
        handle.revert()
        return True
    found = False
    for module in model.modules():
        module_handle = _MODULE_HANDLES.pop(module, None)
        if module_handle is not None:
            module_handle.revert()
            found = True
    return found
