"""Pin the SDPA backends a module's forward may use (`torch.nn.attention.sdpa_kernel`).

The pin is two small module-level objects rather than a closure. `PinnedCall` is the forward as a
function of `self`: the original, run inside `sdpa_kernel(backends)`. `PinnedForward` is that function
bound to one object, as `types.MethodType` binds a method, but it keeps the object as a plain attribute:
`copy.deepcopy` therefore rebinds it to the copy (which computes with its own weights), and pickle /
`torch.save` store it with the model (a method object pickles as `getattr(obj, "forward")`, which on
load would be the unpinned class forward).
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Iterable
from typing import Any, TypeVar

from torch.nn.attention import SDPBackend, sdpa_kernel

from ._patch import Patch, mark, patch_name
from ._repr import short_repr
from .signature import assert_same_signature, with_self

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

# Longer `__wrapped__` chains than this are loops, not stacked wrappers.
_MAX_CHAIN = 32


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
        raise ValueError(
            f"backends is empty ({backends!r}); give at least one SDPBackend (e.g. [SDPBackend.MATH]) or None"
        )
    for position, backend in enumerate(chosen):
        if not isinstance(backend, SDPBackend):
            raise TypeError(
                f"backends[{position}] is {backend!r} ({type(backend).__name__}), expected a "
                f"torch.nn.attention.SDPBackend such as {', '.join(b.name for b in DEFAULT_SDPA_BACKENDS)}"
            )
        if backend == SDPBackend.ERROR:
            raise ValueError(f"backends[{position}] is SDPBackend.ERROR, which is not a usable backend")
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"backends has duplicates: {[b.name for b in chosen]}")
    return chosen


def sdpa_context(backends: tuple[SDPBackend, ...]) -> Any:
    """`sdpa_kernel(backends)`, in priority order where torch supports it."""
    if _HAS_SET_PRIORITY:
        return sdpa_kernel(list(backends), set_priority=True)
    return sdpa_kernel(list(backends))


class CallAsIs:
    """A forward that is not a method of the pinned object, as a function of `self` that ignores `self`."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(self, _instance: Any, /, *args: Any, **kwargs: Any) -> Any:
        return self.original(*args, **kwargs)

    @property
    def __signature__(self) -> inspect.Signature:
        return with_self(inspect.signature(self.original))


def _copy_metadata(target: Any, source: Any) -> None:
    for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
        value = getattr(source, attr, None)
        if isinstance(value, str):
            setattr(target, attr, value)


class PinnedCall:
    """`function(self, ...)` run inside `sdpa_kernel(backends)`: the pinned forward as a function of `self`.

    Stored on a class (a pinned class), it binds per instance like a function does.
    """

    def __init__(self, function: Any, backends: tuple[SDPBackend, ...]) -> None:
        self.__wrapped__ = function
        self.backends = backends
        self.patch: Patch | None = None  # set when this call is the pin of a class
        _copy_metadata(self, function)
        mark(self, SDPA_PATCH_NAME)

    def __call__(self, instance: Any, /, *args: Any, **kwargs: Any) -> Any:
        with sdpa_context(self.backends):
            return self.__wrapped__(instance, *args, **kwargs)

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        return self if instance is None else types.MethodType(self, instance)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(self.__wrapped__)

    # SDPBackend values do not pickle (and deep-copy to new objects): they travel by name.
    def __getstate__(self) -> dict[str, Any]:
        return {**vars(self), "backends": tuple(b.name for b in self.backends)}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update({**state, "backends": tuple(getattr(SDPBackend, n) for n in state["backends"])})


class PinnedForward:
    """A `PinnedCall` bound to one object, like a method, but copied and pickled together with it."""

    def __init__(self, call: PinnedCall, instance: Any) -> None:
        self.__func__ = call
        self.__self__ = instance
        _copy_metadata(self, call)
        mark(self, SDPA_PATCH_NAME)
        self.patch: Patch | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__func__(self.__self__, *args, **kwargs)

    def __repr__(self) -> str:
        names = [b.name for b in self.backends]
        return f"<pinned to {names}: {self.__wrapped__!r}>"

    @property
    def backends(self) -> tuple[SDPBackend, ...]:
        return self.__func__.backends

    @property
    def __wrapped__(self) -> Any:
        """The forward that runs inside the pin, bound to this object."""
        function = self.__func__.__wrapped__
        if isinstance(function, CallAsIs):
            return function.original
        return types.MethodType(function, self.__self__)

    @property
    def __signature__(self) -> inspect.Signature:
        return inspect.signature(types.MethodType(self.__func__, self.__self__))


def _own_forward(obj: Any) -> Any:
    try:
        return vars(obj).get("forward")
    except TypeError:  # no __dict__
        return None


def _is_ours(value: Any, obj: Any) -> bool:
    if isinstance(value, PinnedForward):
        return value.__self__ is obj
    return isinstance(value, PinnedCall) and isinstance(obj, type)


def _pins_below(obj: Any) -> list[Any]:
    """Our pins on the `__wrapped__` chain of `obj`'s own forward (outermost first), the shallowest one first."""
    found = []
    value = _own_forward(obj)
    for _ in range(_MAX_CHAIN):
        if value is None:
            break
        if isinstance(value, (PinnedForward, PinnedCall)):
            found.append(value)
            if isinstance(value, PinnedForward) and value.__self__ is not obj:
                break  # a wrapper copied from another object: what it pins is not this object's forward
            value = value.__func__.__wrapped__ if isinstance(value, PinnedForward) else value.__wrapped__
        else:
            value = getattr(value, "__wrapped__", None)
    return found


def get_sdpa_backends(obj: Any) -> tuple[SDPBackend, ...] | None:
    """The backends `obj.forward` is pinned to by `patch_sdpa_backends` (also under another patch), or None."""
    pins = _pins_below(obj)
    return pins[0].backends if pins else None


def _forward_of(obj: Any) -> Any:
    if isinstance(obj, type):
        static = inspect.getattr_static(obj, "forward", None)
        if isinstance(static, (staticmethod, classmethod)):
            raise TypeError(
                f"obj {obj.__qualname__} has a {type(static).__name__} forward; only a plain method can be pinned"
            )
    try:
        original = obj.forward
    except AttributeError:
        original = None
    if original is None or not callable(original):
        raise TypeError(
            f"obj must have a callable .forward, got {short_repr(obj)}"
            + ("" if original is None else f" whose forward is {short_repr(original)}")
        )
    return original


def _function_of_self(obj: Any, original: Any) -> Any:
    """`original` (obj.forward) as a function of `self`, so that a copy of `obj` calls its own forward."""
    if isinstance(obj, type):
        return original  # a function found on the class: it binds per instance
    if isinstance(original, (types.MethodType, PinnedForward)) and original.__self__ is obj:
        return original.__func__
    return CallAsIs(original)


def patch_sdpa_backends(obj: T, backends: Iterable[SDPBackend] | None = None) -> T:
    """Run `obj.forward` inside `sdpa_kernel(backends)`; returns `obj`.

    `backends` is an ordered list of `SDPBackend` (default: CUDNN, FLASH, EFFICIENT, MATH);
    where torch supports it the order is the priority. The pin is written into `obj`'s own
    `__dict__` (the class is untouched; pinning a class pins its instances), keeps `forward`'s
    signature and docstring, follows `obj` through `copy.deepcopy` and pickling, and
    `unpatch_sdpa_backends(obj)` removes it again. Patching twice with the same backends is a
    no-op; patching with other backends replaces the pinned list. A pin covered by another
    patch (Liger's forward) cannot be replaced: that raises ValueError naming what covers it.
    """
    chosen = _validate_backends(backends)
    original = _forward_of(obj)
    pins = _pins_below(obj)
    if pins:
        if pins[0].backends == chosen:
            return obj
        own = _own_forward(obj)
        if not _is_ours(own, obj):
            raise ValueError(
                f"obj {type(obj).__name__}.forward is pinned to {[b.name for b in pins[0].backends]} beneath "
                f"{patch_name(own) or short_repr(own)}, which would keep that pin in force inside a new one; "
                "undo that patch first, then pin again"
            )
        unpatch_sdpa_backends(obj)
        original = obj.forward

    call = PinnedCall(_function_of_self(obj, original), chosen)
    replacement: Any = call if isinstance(obj, type) else PinnedForward(call, obj)
    assert_same_signature(original, replacement)
    patch = Patch(obj, "forward", replacement)
    replacement.patch = patch
    patch.apply()
    return obj


def unpatch_sdpa_backends(obj: T) -> T:
    """Undo `patch_sdpa_backends(obj)`; a no-op when `obj` is not patched. Returns `obj`.

    Raises RuntimeError when another wrapper was stacked on ours (undo that one first).
    """
    own = _own_forward(obj)
    if _is_ours(own, obj):
        own.patch.revert()
        return obj
    pins = _pins_below(obj)
    if pins:
        raise RuntimeError(
            f"cannot unpatch the SDPA pin of {type(obj).__name__}.forward: something else was patched over it "
            f"(found {patch_name(own) or short_repr(own)}); revert that patch first"
        )
    return obj


__all__ = ["DEFAULT_SDPA_BACKENDS", "get_sdpa_backends", "patch_sdpa_backends", "unpatch_sdpa_backends"]
