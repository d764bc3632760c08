"""Pin the SDPA backends a module's forward may use (`torch.nn.attention.sdpa_kernel`)."""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any, TypeVar

from torch.nn.attention import SDPBackend, sdpa_kernel

from ._patch import Patch, mark, patch_name
from .signature import assert_same_signature

T = TypeVar("T")

SDPA_PATCH_NAME = "am_kernels.sdpa_backends"

#: The seed's order: cuDNN first, then flash, memory-efficient, and math as the last resort.
DEFAULT_SDPA_BACKENDS: tuple[SDPBackend, ...] = (
    SDPBackend.CUDNN_ATTENTION,
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)

# `set_priority` (torch >= 2.6) makes the list order the try-order; older torch only filters.
_HAS_SET_PRIORITY = "set_priority" in inspect.signature(sdpa_kernel).parameters


def _validate_backends(backends: Iterable[SDPBackend] | None) -> tuple[SDPBackend, ...]:
    if backends is None:
        return DEFAULT_SDPA_BACKENDS
    if isinstance(backends, SDPBackend):
        raise TypeError(
            f"backends must be a list of SDPBackend, got the single value {backends!r}; wrap it in [...]"
        )
    if isinstance(backends, (str, bytes)) or not isinstance(backends, Iterable):
        raise TypeError(f"backends must be a list of torch.nn.attention.SDPBackend, got {backends!r}")
    chosen = tuple(backends)
    if not chosen:
        raise ValueError("backends is empty; give at least one SDPBackend (e.g. [SDPBackend.MATH]) or None")
    for position, backend in enumerate(chosen):
        if not isinstance(backend, SDPBackend):
            raise TypeError(
                f"backends[{position}] is {backend!r} ({type(backend).__name__}), expected a "
                f"torch.nn.attention.SDPBackend such as {', '.join(b.name for b in DEFAULT_SDPA_BACKENDS)}"
            )
        if backend is SDPBackend.ERROR:
            raise ValueError(f"backends[{position}] is SDPBackend.ERROR, which is not a usable backend")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"backends has duplicates: {[b.name for b in chosen]}")
    return chosen


def _sdpa_context(backends: tuple[SDPBackend, ...]) -> Any:
    if _HAS_SET_PRIORITY:
        return sdpa_kernel(list(backends), set_priority=True)
    return sdpa_kernel(list(backends))


def _our_patch(obj: Any, *, deep: bool = False) -> Patch | None:
    """The Patch behind our wrapper in `obj.__dict__['forward']`.

    With `deep`, also look through the `__wrapped__` chain of a foreign wrapper stacked on
    ours, so that undo can refuse (instead of silently doing nothing) while it is covered.
    """
    try:
        own = vars(obj).get("forward")
    except TypeError:
        return None
    seen = 0
    while own is not None and seen < 32:
        if patch_name(own) == SDPA_PATCH_NAME and getattr(own, "_am_sdpa_patch", None) is not None:
            return own._am_sdpa_patch
        if not deep:
            return None
        own = getattr(own, "__wrapped__", None)
        seen += 1
    return None


def get_sdpa_backends(obj: Any) -> tuple[SDPBackend, ...] | None:
    """The backends `obj.forward` is pinned to by `patch_sdpa_backends`, or None."""
    patch = _our_patch(obj)
    return None if patch is None else patch.replacement._am_sdpa_backends


def patch_sdpa_backends(obj: T, backends: Iterable[SDPBackend] | None = None) -> T:
    """Run `obj.forward` inside `sdpa_kernel(backends)`; returns `obj`.

    `backends` is an ordered list of `SDPBackend` (default: CUDNN, FLASH, EFFICIENT, MATH);
    where torch supports it the order is the priority. The wrapper is written into `obj`'s own
    `__dict__` (the class is untouched), keeps `forward`'s signature and docstring, and
    `unpatch_sdpa_backends(obj)` removes it again. Patching twice with the same backends is a
    no-op; patching with other backends replaces the pinned list.
    """
    chosen = _validate_backends(backends)
    if not hasattr(obj, "forward"):
        raise TypeError(
            f"patch_sdpa_backends needs an object with a .forward method, got {type(obj).__name__}"
        )
    original = obj.forward
    if not callable(original):
        raise TypeError(f"{type(obj).__name__}.forward is not callable: {original!r}")

    existing = _our_patch(obj)
    if existing is not None:
        if existing.replacement._am_sdpa_backends == chosen:
            return obj
        existing.revert()
        original = obj.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        with _sdpa_context(chosen):
            return original(*args, **kwargs)

    mark(forward, SDPA_PATCH_NAME, wrapped=original)
    forward._am_sdpa_backends = chosen  # type: ignore[attr-defined]
    # A class (not an instance) gets a function, which Python binds per instance as usual.
    replacement: Any = forward
    assert_same_signature(original, replacement)
    patch = Patch(obj, "forward", replacement)
    forward._am_sdpa_patch = patch  # type: ignore[attr-defined]
    patch.apply()
    return obj


def unpatch_sdpa_backends(obj: T) -> T:
    """Undo `patch_sdpa_backends(obj)`; a no-op when `obj` is not patched. Returns `obj`.

    Raises RuntimeError when another wrapper was stacked on ours (undo that one first).
    """
    patch = _our_patch(obj, deep=True)
    if patch is not None:
        patch.revert()
    return obj


__all__ = [
    "DEFAULT_SDPA_BACKENDS",
    "SDPA_PATCH_NAME",
    "get_sdpa_backends",
    "patch_sdpa_backends",
    "unpatch_sdpa_backends",
]
