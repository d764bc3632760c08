"""One TE Linear for a group of sibling projections that a layer calls on the same input (q/k/v, gate/up).

Transformer Engine's FP8 Linear costs a fixed host time per call (quantizer bookkeeping, FP8 metadata, a
separate backward), and a ~1B decoder step on an H200 is bound by that host time, not by the GEMMs. A group
of siblings run as one GEMM makes three calls one (q/k/v) and two calls one (gate/up) without touching the
model's code: each original `nn.Linear` is replaced by a `FusedProjection` that holds the original's own
Parameters (so `state_dict` keys, ties and optimizer state are those of the plain model) and returns its
slice of the group's output. The group's TE Linear is built with `parameters_split` and given the same
Parameter objects, so TE concatenates them per call (one weight copy, negligible next to the GEMM).

Exactness does not depend on the model calling the members on one input: a member's output is always its
slice of `te(its own input)`. The group computes once and serves each member at most once per computation,
and only while the input is the same tensor object, unmodified (`_version`), under the same grad mode and
microbatch flag; any other call computes again (correct, but the whole group's GEMM for one member: a
cross-attention whose keys read another input gains nothing, so such parents are not fused).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._eager import run_eager
from .microbatch import get_is_first_microbatch

__all__ = ["FusedGroup", "FusedProjection", "split_parameter_names"]


def split_parameter_names(name: str) -> tuple[str, str]:
    """The weight and bias names TE's Linear gives the `name` entry of `parameters_split`."""
    stem = name.rstrip("_")
    return f"{stem}_weight", f"{stem}_bias"


class _Columns(torch.autograd.Function):
    """The members' outputs from the group's output: each a contiguous tensor of its own, one cat backward.

    Slicing views instead would cost more than the fusion saves: consumers that need contiguous inputs
    (Liger's SwiGLU and RoPE, attention kernels) copy each view anyway, and each view's backward writes a
    zero-filled tensor of the whole output that autograd then sums. Own tensors (not views) also leave a
    model free to modify its projection in place.
    """

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, sizes: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
        return tuple(piece.clone(memory_format=torch.contiguous_format) for piece in out.split(sizes, -1))

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor, None]:
        # A member whose output took no part in the loss arrives as zeros (materialized grads).
        return torch.cat(grads, -1), None


class FusedGroup:
    """The shared state of one group: its TE Linear, the members' output sizes and the pending outputs."""

    def __init__(self, te: nn.Module, sizes: list[int]) -> None:
        self.te, self.sizes = te, sizes
        self._clear()

    def _clear(self) -> None:
        self._input: torch.Tensor | None = None
        self._key: tuple[Any, ...] = ()
        self._outputs: tuple[torch.Tensor, ...] = ()
        self._pending: set[int] = set()

    def __call__(self, index: int, inp: torch.Tensor, training: bool, is_first_microbatch: bool | None):
        key = (inp._version, torch.is_grad_enabled(), is_first_microbatch, training)
        if not (self._input is inp and self._key == key and index in self._pending):
            if self.te.training != training:
                self.te.train(training)
            out = self.te(inp, is_first_microbatch)
            self._input, self._key = inp, key
            self._outputs, self._pending = _Columns.apply(out, tuple(self.sizes)), set(range(len(self.sizes)))
        self._pending.discard(index)
        result = self._outputs[index]
        if not self._pending:
            self._clear()  # hold neither the input nor the outputs past the last member's call
        return result

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy/pickle between two members' calls must not copy live autograd tensors.
        return {"te": self.te, "sizes": self.sizes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.te, self.sizes = state["te"], state["sizes"]
        self._clear()


class FusedProjection(nn.Module):
    """Stands where one member's `nn.Linear` was: its Parameters, its slice of the group's GEMM."""

    def __init__(self, linear: nn.Linear, group: FusedGroup, index: int) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.index = index
        # Not a submodule: the group's TE Linear holds the same Parameters, which must be listed (and saved)
        # once, under the plain model's names.
        object.__setattr__(self, "group", group)
        self.train(linear.training)

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        if is_first_microbatch is None:
            is_first_microbatch = get_is_first_microbatch()
        return run_eager(self.group, self.index, inp, self.training, is_first_microbatch)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"slice {self.index} of one {type(self.group.te).__name__}"
        )
