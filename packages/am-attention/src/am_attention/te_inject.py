"""Inject a DotProductAttention kernel into every compatible attention module of a HF model, and undo it.

`inject_te_attention(model)` gives each compatible attention module (see `te_plan`) its kernel
(`module.attn_module`, kept out of `state_dict` and `parameters()` because it is stored in the instance
dict, not as a submodule) and its parameters, points the model's modules at their own copies of the
configs they read, set to `attn_implementation="te"` (a config shared with another model is never
changed), sets `model._te_attention_injected`, and keeps "te" registered while it lasts.

Every change is a `Patch`, applied in two phases: every contract first (the forward's dispatch, the
config's backend field, the registry's SDPA functions), then every set; a failed check changes nothing.
What an injection changed on a module is recorded on that module (`_am_te_state`), so the record
travels with the module: `remove_te_attention` finds it on the original, on a `copy.deepcopy` (a whole
model or a pipeline stage cut from one) and on an unpickled model alike, and each copy holds its own
lease on the registration. Nothing process-global refers to an injected model: dropped without undo it is
freed, and "te" goes with the last injected model.
"""

from __future__ import annotations

import copy
import functools
import logging
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import te_backend
from ._patch import Patch, PatchSet
from .te_dispatch import KERNEL_ATTR, PARAMS_ATTR
from .te_params import AttnParams
from .te_plan import (
    STATE_ATTR,
    decide,
    default_dot_product_attention_cls,
    has_foreign_kernel,
    is_candidate,
    is_injected,
)
from .te_probe import CONFIG_ATTR, selecting_config

__all__ = ["inject_te_attention", "inject_te_attention_into_module", "remove_te_attention"]

logger = logging.getLogger(__name__)

MODEL_FLAG = "_te_attention_injected"


class _InstanceDictPatch(Patch):
    """Writes into the instance `__dict__` directly, so nn.Module does not register a submodule."""

    def _set(self, value: Any) -> None:
        vars(self.target)[self.attr] = value

    def _delete(self) -> None:
        del vars(self.target)[self.attr]


class _Record:
    """The patches one injection made on one module; stored on that module, so copies carry their own.

    A record of a module that runs the kernel holds a `te_backend.Lease`; a copy (deepcopy or unpickle) of
    an applied record takes a new one. The model's record also keeps the injection's handle.
    """

    def __init__(self, patches: list[Patch], uses_backend: bool) -> None:
        self.patches = patches
        self.uses_backend = uses_backend
        self.handle: PatchSet | None = None
        self._lease: te_backend.Lease | None = None

    @property
    def applied(self) -> bool:
        return all(p.applied for p in self.patches)

    def hold(self) -> None:
        if self.uses_backend and self._lease is None and self.applied:
            self._lease = te_backend.Lease()

    def release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def __getstate__(self) -> dict[str, Any]:
        return {"patches": self.patches, "uses_backend": self.uses_backend, "handle": self.handle}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lease = None
        self.hold()

    def __deepcopy__(self, memo: dict[int, Any]) -> _Record:
        new = _Record.__new__(_Record)
        memo[id(self)] = new
        new.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return new


def _release_all(records: list[_Record], _handle: Any = None) -> None:
    for record in records:
        record.release()


def _check_selects(config: Any, _live: Any) -> None:
    """Contract of the config field: writing it selects the backend the modeling code reads (on a copy)."""
    selecting_config(config, te_backend.TE_ATTN_IMPLEMENTATION)


def _raise(error: RuntimeError, _live: Any) -> None:
    raise error


def _require_module(value: Any, name: str) -> torch.nn.Module:
    if not isinstance(value, torch.nn.Module):
        raise TypeError(f"{name} must be a torch.nn.Module, got {value!r}")
    return value


def _kernel_factory(cls: Any) -> Callable[..., Any]:
    if cls is None:
        return default_dot_product_attention_cls()
    if not callable(cls):
        raise TypeError(f"dot_product_attention_cls must be a class or callable, got {cls!r}")
    return cls


def _make_kernel(cls: Callable[..., Any], params: AttnParams, module: torch.nn.Module) -> Any:
    # Built without dropout: a call that asks for dropout falls back to SDPA (counted), which keeps
    # the kernel's numerics independent of its own train/eval flag (it is not a registered submodule).
    sinks = {} if params.sinks is None else {"softmax_type": "learnable"}
    kernel = cls(
        num_attention_heads=params.num_heads,
        kv_channels=params.head_dim,
        num_gqa_groups=params.num_kv_heads,
        attention_dropout=0.0,
        qkv_format="bshd",
        attn_mask_type="causal",
        window_size=params.window_size,
        softmax_scale=params.softmax_scale,
        **sinks,
    )
    if not callable(kernel):
        raise TypeError(f"dot_product_attention_cls {cls!r} returned {kernel!r}, not a callable kernel")
    if params.sinks is not None:
        # the kernel's learnable offset *is* the module's sink parameter: trained, saved and loaded with it
        if not isinstance(getattr(kernel, "softmax_offset", None), torch.nn.Parameter):
            raise TypeError(
                f"dot_product_attention_cls {cls!r} built with softmax_type='learnable' has no softmax_offset "
                "parameter to hold the module's sinks"
            )
        kernel.softmax_offset = getattr(module, params.sinks)
    return kernel


def _config_copy(config: Any, field_patches: list[Patch]) -> Any:
    """A shallow copy of `config` that will select "te" (its field set by a patch, checked in phase 1)."""
    te_config = copy.copy(config)
    field_patches.append(
        Patch(
            te_config,
            CONFIG_ATTR,
            te_backend.TE_ATTN_IMPLEMENTATION,
            contract=functools.partial(_check_selects, config),
        )
    )
    return te_config


def _configs_for(
    model: torch.nn.Module, selected: Iterable[Any], field_patches: list[Patch]
) -> dict[int, Any]:
    """id(original config) -> the model's own copy: those of taken modules select "te"; a config holding one
    of them as a sub-config (a VLM's `text_config`) is copied too, pointing at the copy."""
    copies: dict[int, Any] = {}
    for config in selected:
        if id(config) not in copies:
            copies[id(config)] = _config_copy(config, field_patches)
    for module in model.modules():
        config = vars(module).get("config")
        if config is None or id(config) in copies:
            continue
        subs = {k: copies[id(v)] for k, v in vars(config).items() if id(v) in copies and v is not None}
        if subs:
            parent = copy.copy(config)
            vars(parent).update(subs)
            copies[id(config)] = parent
    return copies


def _follows(config: Any) -> bool:
    """Whether the modules that share a taken module's config switch to "te" with it.

    "te" builds SDPA's masks, which may be None where a causal mask was asked for (transformers relies on
    each SDPA module's `is_causal` then). A model built for eager attention never promised that its layers
    read such masks right (BigBird-Pegasus' decoder is not `is_causal` and gets its causal mask from the
    mask builder), so there only the taken modules switch: the rest, mask builders included, keep eager, and
    the kernel reads eager's explicit masks.
    """
    return getattr(config, "_attn_implementation", None) != "eager"


def _apply(handle: PatchSet, records: list[_Record]) -> None:
    """Phase 1 (every contract, the registry's too), phase 2 (every set), then the leases; all or nothing."""
    if any(record.uses_backend for record in records):
        te_backend.check_registration()
    handle.apply()
    try:
        for record in records:
            record.hold()
    except BaseException:
        _release_all(records)
        handle.revert()
        raise


def _record(module: torch.nn.Module, patches: list[Patch], uses_backend: bool) -> _Record:
    record = _Record(patches, uses_backend)
    patches.append(_InstanceDictPatch(module, STATE_ATTR, record))
    return record


def inject_te_attention_into_module(
    module: torch.nn.Module,
    *,
    dot_product_attention_cls: Callable[..., torch.nn.Module] | None = None,
) -> bool:
    """Give one HF attention module its kernel; True when it now runs it, False when it cannot take it.

    False silently when its layout does not fit, with a warning when its forward does not dispatch
    through the attention interface (probed); raises before any change when the forward dispatches
    but drops what the kernel path needs (see `te_probe.check_dispatch`). The module gets its own copy of
    its config, selecting "te"; the rest of its model is unchanged. Undone by `remove_te_attention` on
    the module or on any model containing it.
    """
    _require_module(module, "module")
    cls = _kernel_factory(dot_product_attention_cls)
    if is_injected(module):
        return True
    if has_foreign_kernel(module) or getattr(module, "config", None) is None:
        return False
    decision = decide(module, cls)
    if decision.params is None:
        return False
    if decision.reason:
        warnings.warn(
            f"TE attention skips {type(module).__name__}: {decision.reason}", UserWarning, stacklevel=2
        )
        return False
    field_patches: list[Patch] = []
    te_config = _config_copy(module.config, field_patches)
    patches = _module_patches(module, cls, decision, te_config)
    record = _record(module, patches, uses_backend=True)
    handle = PatchSet([*field_patches, *patches], name=f"te_attention[{type(module).__name__}]")
    handle.on_revert.append(functools.partial(_release_all, [record]))
    _apply(handle, [record])
    return True


def _module_patches(module, cls, decision, te_config) -> list[Patch]:
    contract = None if decision.error is None else functools.partial(_raise, decision.error)
    return [
        _InstanceDictPatch(
            module, KERNEL_ATTR, _make_kernel(cls, decision.params, module), contract=contract
        ),
        _InstanceDictPatch(module, PARAMS_ATTR, decision.params),
        _InstanceDictPatch(module, "config", te_config),
    ]


def _model_record(model: torch.nn.Module) -> _Record | None:
    record = vars(model).get(STATE_ATTR)
    return record if isinstance(record, _Record) else None


def inject_te_attention(
    model: torch.nn.Module,
    *,
    dot_product_attention_cls: Callable[..., torch.nn.Module] | None = None,
) -> PatchSet:
    """Inject the kernel into all compatible attention modules; a second call returns the first handle.

    Returns the injection's handle (a `PatchSet`: `.revert()`, context manager, `.taken` = the names of
    the modules that run the kernel). Call after weights are loaded and before FSDP wrapping. Modules that
    cannot take the kernel keep transformers' SDPA; `plan_te_attention(model)` says which and why.
    """
    _require_module(model, "model")
    cls = _kernel_factory(dot_product_attention_cls)
    existing = _model_record(model)
    if existing is not None and existing.handle is not None and existing.handle.applied:
        return existing.handle
    if existing is not None and existing.handle is None:
        return _adopt(model)  # a copied part of an injected model (a pipeline stage): its own handle
    if existing is not None:
        raise RuntimeError(
            f"{type(model).__name__} carries a TE injection that was partly removed; "
            "call remove_te_attention(model) first"
        )
    if vars(model).get(MODEL_FLAG):
        raise RuntimeError(f"{type(model).__name__} is flagged {MODEL_FLAG} but carries no injection record")
    taken: list[str] = []
    chosen: list[tuple[torch.nn.Module, Any]] = []
    broken: list[tuple[str, torch.nn.Module, Any]] = []
    for name, module in model.named_modules():
        if not is_candidate(module) or getattr(module, "config", None) is None:
            continue
        if is_injected(module):
            taken.append(name)  # injected before (inject_te_attention_into_module, or a copied module)
            continue
        if has_foreign_kernel(module):
            continue
        decision = decide(module, cls)
        if decision.params is None:
            continue
        if decision.reason:
            warnings.warn(f"TE attention skips {name}: {decision.reason}", UserWarning, stacklevel=2)
            continue
        if decision.error is not None:
            broken.append((name, module, decision))
            continue
        taken.append(name)
        chosen.append((module, decision))
    if chosen or taken:
        # one submodule whose private contract does not hold (a VLM's vision attention) keeps its attention
        for name, _, decision in broken:
            warnings.warn(f"TE attention skips {name}: refused: {decision.error}", UserWarning, stacklevel=2)
    else:  # nothing else to take: the broken contract is the answer, raised before any change
        taken.extend(name for name, _, _ in broken)
        chosen.extend((module, decision) for _, module, decision in broken)
    earlier = _records(model)  # injected before: the handle covers them too, as remove_te_attention does
    field_patches: list[Patch] = []
    copies = _configs_for(model, (m.config for m, _ in chosen), field_patches)
    records: list[_Record] = []
    patches: list[Patch] = list(field_patches)
    kernels = {id(m): d for m, d in chosen}
    for module in model.modules():
        config = vars(module).get("config")
        own: list[Patch] = []
        if id(module) in kernels:
            own = _module_patches(module, cls, kernels[id(module)], copies[id(config)])
        elif config is not None and id(config) in copies and not is_injected(module) and _follows(config):
            own = [_InstanceDictPatch(module, "config", copies[id(config)])]
        if module is model and chosen:
            own.append(Patch(model, MODEL_FLAG, True))
        if own or module is model:
            records.append(_record(module, own, uses_backend=id(module) in kernels))
            patches.extend(own)
    handle = PatchSet(patches, name="te_attention")
    handle.taken = taken  # type: ignore[attr-defined]
    records[0].handle = handle  # model.modules() yields the model first
    _apply(handle, records)
    handle.patches.extend(p for r in earlier for p in r.patches)
    handle.on_revert.append(functools.partial(_release_all, records + earlier))
    logger.info("TE attention injected into %d modules of %s", len(chosen), type(model).__name__)
    return handle


def _records(model: torch.nn.Module) -> list[_Record]:
    return [r for r in (vars(m).get(STATE_ATTR) for m in model.modules()) if isinstance(r, _Record)]


def _adopt(model: torch.nn.Module) -> PatchSet:
    """A handle for the records a copied part of an injected model carries; kept on its root's record."""
    records = _records(model)
    handle = PatchSet([p for r in records for p in r.patches], name="te_attention")
    handle.taken = [n for n, m in model.named_modules() if is_injected(m)]  # type: ignore[attr-defined]
    handle.on_revert.append(functools.partial(_release_all, records))
    records[0].handle = handle
    return handle


def remove_te_attention(model: torch.nn.Module) -> bool:
    """Undo every injection recorded on `model` or its modules (also on copies); False when there was none.

    Every patch is checked before any is reverted, so a foreign patch stacked on ours leaves all in place.
    """
    _require_module(model, "model")
    records = _records(model)
    if not records:
        return False
    patches: dict[int, Patch] = {}
    for record in records:
        if record.handle is not None:
            patches.update((id(p), p) for p in record.handle.patches)
        patches.update((id(p), p) for p in record.patches)
    PatchSet(list(patches.values()), name="remove_te_attention").revert()
    _release_all(records)
    return True
