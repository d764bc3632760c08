"""Signature equality check used before every forward replacement."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def _signature(func: Callable[..., Any], role: str) -> inspect.Signature:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"cannot read the signature of the {role} callable {func!r}: {exc}") from exc


def with_self(sig: inspect.Signature) -> inspect.Signature:
    """`sig` with a leading `self`: the signature of a function that is bound to become `sig`.

    `self` is positional-only so it is valid before any parameter kind; binding drops it again.
    """
    bound_self = inspect.Parameter("_am_self", inspect.Parameter.POSITIONAL_ONLY)
    return sig.replace(parameters=[bound_self, *sig.parameters.values()])


def assert_same_signature(original: Callable[..., Any], patched: Callable[..., Any]) -> None:
    """Raise AssertionError naming both signatures when `original` and `patched` differ.

    Signatures are read with `inspect.signature`, which follows `__wrapped__`: this is the
    signature callers and introspection (e.g. a trainer filtering dataset columns by
    `forward`'s parameters) see, so it is what a replacement must keep.
    """
    before = _signature(original, "original")
    after = _signature(patched, "patched")
    if before != after:
        # An explicit raise, not `assert`, so the check survives `python -O`.
        raise AssertionError(
            f"signature changed by the patch: original {getattr(original, '__qualname__', original)!s}{before} "
            f"!= patched {getattr(patched, '__qualname__', patched)!s}{after}"
        )
