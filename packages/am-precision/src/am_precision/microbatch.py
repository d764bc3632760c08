"""Training-loop flags read by the TE module patches: first microbatch (FP8 weight caching) and optim step.

They are plain module globals on purpose, as in the seed: the training loop sets them on the thread that
runs the forward passes, and TE modules read them during those forwards. Use the getters; a name imported
with `from ... import` would be a stale copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")

_is_first_microbatch: bool | None = None
_is_optim_step: bool = False


def set_is_first_microbatch(value: bool | None) -> None:
    """True on the first microbatch (TE quantizes and caches FP8 weights), False after it, None to disable."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(f"set_is_first_microbatch(value): value must be True, False or None, got {value!r}")
    global _is_first_microbatch
    _is_first_microbatch = value


def get_is_first_microbatch() -> bool | None:
    """The flag set by `set_is_first_microbatch` (None: FP8 weight caching disabled)."""
    return _is_first_microbatch


def set_is_optim_step(value: bool) -> None:
    """Mark whether the current step runs the optimizer."""
    if not isinstance(value, bool):
        raise TypeError(f"set_is_optim_step(value): value must be True or False, got {value!r}")
    global _is_optim_step
    _is_optim_step = value


def get_is_optim_step() -> bool:
    """The flag set by `set_is_optim_step`."""
    return _is_optim_step


def iter_microbatches(microbatches: Iterable[T]) -> Iterator[T]:
    """Yield each microbatch of one optimizer step with the first-microbatch flag set (True, then False).

    TE Linears (swapped in by `inject_te_linear`) then quantize and cache their FP8 weights on the first
    microbatch and reuse them on the rest; the flag is reset to None when the loop ends or breaks.
    """
    if isinstance(microbatches, (str, bytes)) or not isinstance(microbatches, Iterable):
        raise TypeError(f"microbatches must be an iterable of batches, got {type(microbatches).__name__}")
    try:
        for index, batch in enumerate(microbatches):
            set_is_first_microbatch(index == 0)
            yield batch
    finally:
        set_is_first_microbatch(None)


__all__ = [
    "get_is_first_microbatch",
    "get_is_optim_step",
    "iter_microbatches",
    "set_is_first_microbatch",
    "set_is_optim_step",
]
