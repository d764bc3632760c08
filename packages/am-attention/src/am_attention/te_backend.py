"""The "te" attention backend: a transformers attention function that runs a DotProductAttention per module.

Registered under `attn_implementation="te"` in transformers' `AttentionInterface` (and the matching mask
function in `AttentionMaskInterface`, which builds SDPA-style masks). Both are registry entries applied
through `ItemPatch` under one process-wide `GlobalPatch`, so registering is explicit and undone exactly.
Nothing process-global is swapped: models whose config names another backend never reach this code, and
modules without an injected kernel run transformers' own SDPA function (with the exact mask, see
`te_dispatch`).

Injected modules hold a `Lease` on the registration: the first registers "te" when it is not registered,
and the registration a lease made goes with the last lease, released by `remove_te_attention` or when an
injected model is garbage-collected without it. Copies of injected models (deepcopy, pickle) take their
own leases, so they keep working after the original is removed.

Under `torch.compile` the call runs outside the graph (one graph break per attention call): which kernel
path a batch takes depends on tensor values, and deciding it there keeps compiled numbers equal to eager
ones, the dispatch counters free of guards and the decisions memoised once per forward.
"""

from __future__ import annotations

import inspect
import threading
import warnings
import weakref
from typing import Any

import torch

from ._contract import contract_error, import_module_checked, require_parameters
from ._patch import GlobalPatch, ItemPatch, PatchSet, mark
from .te_dispatch import dispatch

__all__ = [
    "TE_ATTN_IMPLEMENTATION",
    "register_te_attention_backend",
    "te_attention_forward",
    "unregister_te_attention_backend",
]

TE_ATTN_IMPLEMENTATION = "te"


def te_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, S, D] inputs, [B, S, H, D] output, like SDPA's."""
    backend = _BACKEND.active
    if backend is None:
        raise RuntimeError("the 'te' attention backend was called without being registered")
    run = backend.outside_graph if torch.compiler.is_compiling() else dispatch
    return run(backend.sdpa, module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)


def te_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask function for "te": SDPA's (bool masks, or None when transformers can skip the causal mask)."""
    backend = _BACKEND.active
    if backend is None:
        raise RuntimeError("the 'te' attention mask function was called without being registered")
    return backend.sdpa_mask(*args, **kwargs)


mark(te_attention_forward, "am_attention.te_attention_forward")
mark(te_mask, "am_attention.te_mask")


def _interfaces() -> tuple[type, type]:
    mu = import_module_checked("transformers.modeling_utils")
    mk = import_module_checked("transformers.masking_utils")
    attn_iface = getattr(mu, "AttentionInterface", None)
    mask_iface = getattr(mk, "AttentionMaskInterface", None)
    for name, iface in (("AttentionInterface", attn_iface), ("AttentionMaskInterface", mask_iface)):
        mapping = getattr(iface, "_global_mapping", None)
        if not isinstance(mapping, dict) or "sdpa" not in mapping:
            raise contract_error(
                f"transformers {name}._global_mapping", "expected a dict with an 'sdpa' entry"
            )
    return attn_iface, mask_iface


# te_mask forwards transformers' keyword call unchanged; these must be real parameters of the sdpa mask
# function (its **kwargs would swallow them silently), so the mask it builds honours the mask function,
# the padding mask and the causal-skip request the "te" dispatcher classifies.
_MASK_PARAMETERS = ("batch_size", "kv_length", "mask_function", "attention_mask", "allow_is_causal_skip")
_ATTENTION_PARAMETERS = ("module", "query", "key", "value", "attention_mask", "scaling", "is_causal")


def _check_attention_delegate(sdpa: Any, _live: Any = None) -> None:
    require_parameters(sdpa, _ATTENTION_PARAMETERS, "transformers.modeling_utils.AttentionInterface['sdpa']")


def _check_mask_delegate(sdpa_mask: Any, _live: Any = None) -> None:
    what = "transformers.masking_utils.AttentionMaskInterface['sdpa']"
    sig = require_parameters(sdpa_mask, (), what)
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [
        n for n in _MASK_PARAMETERS if n not in sig.parameters or sig.parameters[n].kind not in keyword_kinds
    ]
    if missing:
        raise contract_error(what, f"expected keyword parameters {missing} in signature {sig}")


def _build_registration() -> PatchSet:
    """The two registry entries; their contracts check the SDPA functions "te" delegates to."""
    attn_iface, mask_iface = _interfaces()
    sdpa = attn_iface._global_mapping["sdpa"]
    sdpa_mask = mask_iface._global_mapping["sdpa"]
    patches = PatchSet(
        [
            ItemPatch(
                attn_iface._global_mapping,
                TE_ATTN_IMPLEMENTATION,
                te_attention_forward,
                contract=lambda _live: _check_attention_delegate(sdpa),
                label="AttentionInterface._global_mapping",
            ),
            ItemPatch(
                mask_iface._global_mapping,
                TE_ATTN_IMPLEMENTATION,
                te_mask,
                contract=lambda _live: _check_mask_delegate(sdpa_mask),
                label="AttentionMaskInterface._global_mapping",
            ),
        ],
        name="te_attention_backend",
    )
    # What the registered functions delegate to, kept with the registration they belong to. transformers
    # imports torch._dynamo, so building the compile-time entry here costs the import of nothing.
    patches.sdpa, patches.sdpa_mask = sdpa, sdpa_mask  # type: ignore[attr-defined]
    patches.outside_graph = torch.compiler.disable(dispatch)  # type: ignore[attr-defined]
    return patches


_BACKEND = GlobalPatch(_build_registration)


class _Leases:
    """How many injected modules hold the registration, and whether the last one takes it away."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.count = 0
        self.owned = False  # True: made for leases (or unregistered while leased): goes with the last lease


_LEASES = _Leases()


def check_registration() -> None:
    """Phase 1 of an injection: the registration's contracts, when "te" is not registered yet."""
    if _BACKEND.active is None:
        _build_registration().check()


def _acquire() -> None:
    with _LEASES.lock:
        if _BACKEND.active is None:
            _BACKEND.apply()
            _LEASES.owned = True
        _LEASES.count += 1


def _release(collected: bool) -> None:
    with _LEASES.lock:
        _LEASES.count -= 1
        if _LEASES.count or not _LEASES.owned:
            return
        try:
            _BACKEND.revert()
        except RuntimeError as exc:  # something was registered over "te": leave both, say so
            if not collected:
                raise
            warnings.warn(f"the 'te' backend stays registered: {exc}", RuntimeWarning, stacklevel=2)
            return
        _LEASES.owned = False


class Lease:
    """Keeps "te" registered while an injected module holds it; `release()` (or garbage collection) gives it back."""

    def __init__(self) -> None:
        _acquire()
        self._finalizer = weakref.finalize(self, _release, True)
        self._finalizer.atexit = False  # nothing to give back when the interpreter exits

    def release(self) -> None:
        if self._finalizer.detach() is not None:
            _release(False)


def live_leases() -> int:
    """How many injected modules hold the registration (tests use it to find leaked injections)."""
    return _LEASES.count


def register_te_attention_backend() -> PatchSet:
    """Register `attn_implementation="te"` (attention + mask functions); idempotent; undo with `unregister_...`.

    An explicit registration stays until `unregister_te_attention_backend()`, also after injections end.
    """
    with _LEASES.lock:
        handle = _BACKEND.apply()
        _LEASES.owned = False
        return handle


def unregister_te_attention_backend() -> None:
    """Remove the "te" registry entries; a no-op when not registered.

    While injected modules still use the backend it stays, and goes when the last of them is removed.
    """
    with _LEASES.lock:
        if _LEASES.count:
            _LEASES.owned = True
            return
        _BACKEND.revert()
        _LEASES.owned = False


def is_te_attention_backend_registered() -> bool:
    return _BACKEND.active is not None
