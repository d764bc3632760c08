"""A Linear and an FP8 autocast with Transformer Engine's call convention, on plain torch (CPU tests, smoke runs).

`ReferenceTELinear` takes what `transformer_engine.pytorch.Linear` takes from `inject_te_linear`
(`in_features, out_features, bias=..., params_dtype=..., device=...`), names its parameters `weight`/`bias`,
keeps no bias parameter when built with `bias=False` (TE keeps an empty plain tensor there), adds an
`_extra_state` entry to `state_dict` as TE does (an empty uint8 tensor: no FP8 state), and its forward is
`forward(inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False)`.

Outside `reference_fp8_autocast` it computes `F.linear` exactly. Inside, it emulates the *forward* rounding
of TE's current scaling: input and weight are scaled per tensor to e4m3's range (amax -> 448), rounded to
`torch.float8_e4m3fn` and scaled back; gradients pass straight through (no e5m2 rounding of the backward).
Like TE, `is_first_microbatch=True` quantizes the weight and caches it, `False` reuses the cache (the weight
must not change between microbatches), `None` quantizes every call. It says nothing about TE's kernels.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ReferenceTELinear", "reference_fp8_autocast"]

_E4M3_MAX = 448.0
_ACTIVE_RECIPE: ContextVar[Any] = ContextVar("am_precision_reference_fp8_recipe", default=None)


def _fake_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded through e4m3 with one current-scaling factor; the gradient passes straight through."""
    amax = x.detach().abs().amax().float().clamp_min(1e-12)
    scale = _E4M3_MAX / amax
    q = ((x.detach().float() * scale).to(torch.float8_e4m3fn).float() / scale).to(x.dtype)
    return q + (x - x.detach())  # exactly q in value, identity gradient


@contextmanager
def reference_fp8_autocast(
    enabled: bool = True, calibrating: bool = False, recipe: Any = None, amax_reduction_group: Any = None
) -> Iterator[None]:
    """`transformer_engine.pytorch.autocast`'s signature: inside it, `ReferenceTELinear` emulates FP8 rounding."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True or False, got {enabled!r}")
    token = _ACTIVE_RECIPE.set(("current" if recipe is None else recipe) if enabled else None)
    try:
        yield
    finally:
        _ACTIVE_RECIPE.reset(token)


class ReferenceTELinear(nn.Module):
    """`y = x W^T + b` with TE Linear's constructor, forward and state_dict layout (see module doc)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool = True,
        params_dtype: torch.dtype | None = None,
        device: torch.device | str | None = "cuda",
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bias
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device))
        nn.init.normal_(self.weight, std=0.02)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.bias = torch.empty(0, dtype=dtype, device=device)  # a plain tensor, as TE keeps it
        self._cached_weight: torch.Tensor | None = None

    def forward(
        self,
        inp: torch.Tensor,
        is_first_microbatch: bool | None = None,
        fp8_output: bool = False,
        fp8_grad: bool = False,
    ) -> torch.Tensor:
        bias = self.bias if self.use_bias else None
        if _ACTIVE_RECIPE.get() is None:
            return F.linear(inp, self.weight, bias)
        if is_first_microbatch is False and self._cached_weight is not None:
            quantized = self._cached_weight
        else:
            quantized = _fake_e4m3(self.weight).detach()
            self._cached_weight = quantized if is_first_microbatch else None
        # Value of the (cached) FP8 weight, gradient to the live parameter.
        weight = quantized + (self.weight - self.weight.detach())
        return F.linear(_fake_e4m3(inp), weight, bias)

    def get_extra_state(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.uint8)

    def set_extra_state(self, state: Any) -> None:
        if state is not None and not isinstance(state, torch.Tensor):
            raise TypeError(
                f"ReferenceTELinear extra state must be a tensor or None, got {type(state).__name__}"
            )

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.use_bias}"
