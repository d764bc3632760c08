"""Patch Transformer Engine module forwards once, on first use, through the patch protocol.

Two changes, applied to the TE classes when a TE-backed module is first built (never at import):
1. Unallocated inputs (meta/fake tensors, used by pipeline-parallel shape inference) return an empty tensor
   of the right shape instead of reaching TE kernels, which cannot take them.
2. `is_first_microbatch` defaults to the flag from `set_is_first_microbatch` for `Linear` and
   `GroupedLinear`, so TE caches FP8 weights on the first microbatch and reuses them for the rest of a
   gradient-accumulation step without every caller threading the argument through.

Each change is a `Patch` of `<TE class>.forward` with a contract check (TE's signature must still accept
`is_first_microbatch`; a drift is a RuntimeError naming the function and the installed transformer-engine),
marked `am_precision.te_*`. The set is applied two-phase (every contract, then every set) and its one
process-wide handle is a `GlobalPatch`; the handle reverts them all.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

import torch

from . import availability
from ._contract import contract_error
from ._patch import GlobalPatch, Patch, PatchSet, mark
from .microbatch import get_is_first_microbatch


def is_tensor_unallocated(tensor: torch.Tensor) -> bool:
    """True for tensors without real storage (meta, fake, storage-less subclasses) or with no elements.

    TE kernels cannot take these; the TE patches short-circuit them.
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"tensor must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.is_meta:
        return True
    from torch._subclasses.fake_tensor import FakeTensor

    if isinstance(tensor, FakeTensor):
        return True
    try:
        return tensor.data_ptr() == 0 or tensor.numel() == 0
    except RuntimeError:
        # "Cannot access data pointer of Tensor that doesn't have storage": that *is* the answer here.
        return True


def load_te() -> Any:
    """Import `transformer_engine.pytorch`, or raise ImportError with the install line."""
    if not availability.HAVE_TE:
        raise ImportError(f"transformer-engine is not installed: {availability.TE_INSTALL_HINT}")
    return importlib.import_module("transformer_engine.pytorch")


_TE = "transformer_engine"


def _require_first_microbatch_arg(cls: type) -> Callable[[Any], None]:
    def check(forward: Any) -> None:
        what = f"{cls.__module__}.{cls.__qualname__}.forward"
        if not callable(forward):
            raise contract_error(what, f"expected a callable, found {forward!r}", library=_TE)
        try:
            params = inspect.signature(forward).parameters
        except (TypeError, ValueError) as exc:
            raise contract_error(what, f"its signature cannot be read ({exc})", library=_TE) from exc
        if "is_first_microbatch" not in params:
            raise contract_error(
                what, f"its signature {tuple(params)} no longer takes is_first_microbatch", library=_TE
            )

    return check


def _require_callable(cls: type) -> Callable[[Any], None]:
    def check(forward: Any) -> None:
        if not callable(forward):
            what = f"{cls.__module__}.{cls.__qualname__}.forward"
            raise contract_error(what, f"expected a callable, found {forward!r}", library=_TE)

    return check


def _linear_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(
        self: Any, inp: torch.Tensor, is_first_microbatch: bool | None = None, *args: Any, **kwargs: Any
    ):
        if is_tensor_unallocated(inp) and not torch.compiler.is_compiling():
            return torch.empty((*inp.shape[:-1], self.out_features), dtype=inp.dtype, device=inp.device)
        if is_first_microbatch is None:
            is_first_microbatch = get_is_first_microbatch()
        return original(self, inp, is_first_microbatch, *args, **kwargs)

    return mark(forward, "am_precision.te_linear_forward", wrapped=original)


def _grouped_linear_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(
        self: Any, inp: torch.Tensor, m_splits: Any, is_first_microbatch: bool | None = None, **kwargs: Any
    ):
        if is_first_microbatch is None:
            is_first_microbatch = get_is_first_microbatch()
        return original(self, inp, m_splits, is_first_microbatch=is_first_microbatch, **kwargs)

    return mark(forward, "am_precision.te_grouped_linear_forward", wrapped=original)


def _rms_norm_forward(original: Callable[..., Any]) -> Callable[..., Any]:
    def forward(self: Any, inp: torch.Tensor, *args: Any, **kwargs: Any):
        # Under torch.compile, inductor's fake tensors report data_ptr()==0 but are not unallocated;
        # returning empty_like there would cut the autograd graph.
        if is_tensor_unallocated(inp) and not torch.compiler.is_compiling():
            return torch.empty_like(inp)
        return original(self, inp, *args, **kwargs)

    return mark(forward, "am_precision.te_rms_norm_forward", wrapped=original)


def _te_patches(te: Any) -> PatchSet:
    """The PatchSet of TE's Linear / GroupedLinear / RMSNorm forwards (applied by the caller)."""
    patches = PatchSet(name="am_precision.te_modules")
    for attr, factory, contract in (
        ("Linear", _linear_forward, _require_first_microbatch_arg),
        ("GroupedLinear", _grouped_linear_forward, _require_first_microbatch_arg),
        ("RMSNorm", _rms_norm_forward, _require_callable),
    ):
        cls = getattr(te, attr, None)
        if cls is None:
            if attr == "GroupedLinear":  # absent from very old TE; nothing to patch then
                continue
            raise contract_error(f"transformer_engine.pytorch.{attr}", "not found", library=_TE)
        original = cls.forward  # may be inherited: the Patch captures vars(cls) for revert
        patches.add(Patch(cls, "forward", factory(original), contract=contract(cls)))
    return patches


class LazyTEPatcher:
    """Callable that applies the TE patches on its first call and returns the handle; later calls are no-ops.

    `loader` returns the `transformer_engine.pytorch` module (default: import it), called on the first
    call only. `revert()` (or reverting the returned handle) restores TE's original forwards; a later call
    patches again. Also a context manager. The one-handle bookkeeping is the shared `GlobalPatch`.
    """

    def __init__(self, loader: Callable[[], Any] | None = None) -> None:
        if loader is not None and not callable(loader):
            raise TypeError(
                f"loader must be None or a callable returning transformer_engine.pytorch, got {loader!r}"
            )
        load = loader or load_te
        self._global = GlobalPatch(lambda: _te_patches(load()))

    @property
    def applied(self) -> bool:
        return self._global.active is not None

    def __call__(self) -> PatchSet:
        return self._global.apply()

    def revert(self) -> None:
        self._global.revert()

    def __enter__(self) -> PatchSet:
        return self()

    def __exit__(self, *exc: object) -> None:
        self.revert()


def make_lazy_te_patcher(loader: Callable[[], Any] | None = None) -> LazyTEPatcher:
    """A new `LazyTEPatcher`: patches TE modules exactly once, importing TE only on the first call."""
    return LazyTEPatcher(loader)


_default_patcher = make_lazy_te_patcher()


def patch_te_modules() -> PatchSet:
    """Apply the TE patches (idempotent); called by `initialize_*_module("te", ...)`. Returns the handle."""
    return _default_patcher()


def unpatch_te_modules() -> None:
    """Undo `patch_te_modules` (no-op when not applied)."""
    _default_patcher.revert()


__all__ = ["is_tensor_unallocated", "make_lazy_te_patcher", "patch_te_modules", "unpatch_te_modules"]
