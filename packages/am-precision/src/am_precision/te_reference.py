"""A Linear and an FP8 autocast with Transformer Engine's call convention, on plain torch (CPU tests, smoke runs).

`ReferenceTELinear` takes what `transformer_engine.pytorch.Linear` takes from `inject_te_linear`
(`in_features, out_features, bias=..., params_dtype=..., device=...`), names its parameters `weight`/`bias`,
keeps no bias parameter when built with `bias=False` (TE keeps an empty plain tensor there), adds an
`_extra_state` entry to `state_dict` as TE does (an empty uint8 tensor: no FP8 state), and its forward is
`forward(inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False)`. With `parameters_split={name: rows}`
it keeps one `{name}_weight` (and `{name}_bias`) Parameter per entry, as TE does, and concatenates them per call.

Outside `reference_fp8_autocast` it computes `F.linear` exactly. Inside, it emulates the *forward* rounding
of TE's current scaling: input and weight are scaled per tensor to e4m3's range (amax -> 448), rounded to
`torch.float8_e4m3fn` and scaled back; gradients pass straight through (no e5m2 rounding of the backward).
Like TE, `is_first_microbatch=True` quantizes the weight and caches it, `False` reuses the cache (the weight
must not change between microbatches), `None` quantizes every call. It says nothing about TE's kernels.
`ReferenceTELayerNormMLP` stands in for TE's `LayerNormMLP` (RMSNorm, SwiGLU) the same way, for `inject_te_mlp`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .te_fused import split_parameter_names

__all__ = ["ReferenceTELayerNormMLP", "ReferenceTELinear", "reference_fp8_autocast"]

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


class _WeightCache:
    """TE's FP8 weight caching: quantize and keep on the first microbatch, reuse on the others."""

    def __init__(self) -> None:
        self._cached: dict[str, torch.Tensor] = {}

    def __call__(self, key: str, weight: torch.Tensor, is_first_microbatch: bool | None) -> torch.Tensor:
        quantized = self._cached.get(key) if is_first_microbatch is False else None
        if quantized is None:
            quantized = _fake_e4m3(weight).detach()
            if is_first_microbatch:
                self._cached[key] = quantized
            else:
                self._cached.pop(key, None)
        # Value of the (cached) FP8 weight, gradient to the live parameters.
        return quantized + (weight - weight.detach())


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
        parameters_split: dict[str, int] | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be True or False, got {bias!r}")
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        split = {"": out_features} if parameters_split is None else dict(parameters_split)
        if sum(split.values()) != out_features or not all(
            isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in split.values()
        ):
            raise ValueError(
                f"parameters_split must map names to positive row counts summing to out_features="
                f"{out_features}, got {parameters_split!r}"
            )
        self.in_features, self.out_features, self.use_bias = in_features, out_features, bias
        self._weight_names = [split_parameter_names(n)[0] if n else "weight" for n in split]
        self._bias_names = [split_parameter_names(n)[1] if n else "bias" for n in split]
        for weight_name, bias_name, rows in zip(self._weight_names, self._bias_names, split.values()):
            weight = nn.Parameter(torch.empty(rows, in_features, dtype=dtype, device=device))
            nn.init.normal_(weight, std=0.02)
            setattr(self, weight_name, weight)
            if bias:
                setattr(self, bias_name, nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)))
            else:  # a plain tensor, as TE keeps it
                setattr(self, bias_name, torch.empty(0, dtype=dtype, device=device))
        self._weight_cache = _WeightCache()

    def forward(
        self,
        inp: torch.Tensor,
        is_first_microbatch: bool | None = None,
        fp8_output: bool = False,
        fp8_grad: bool = False,
    ) -> torch.Tensor:
        weight = torch.cat([getattr(self, n) for n in self._weight_names])
        bias = torch.cat([getattr(self, n) for n in self._bias_names]) if self.use_bias else None
        if _ACTIVE_RECIPE.get() is None:
            return F.linear(inp, weight, bias)
        weight = self._weight_cache("weight", weight, is_first_microbatch)
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


class ReferenceTELayerNormMLP(nn.Module):
    """`fc2(swiglu(fc1(rmsnorm(x))))` with TE LayerNormMLP's constructor, parameter names and forward.

    Built as `inject_te_mlp` builds TE's (`normalization="RMSNorm"`, `activation="swiglu"`, `bias=False`);
    parameters `layer_norm_weight` [hidden], `fc1_weight` [2 * ffn, hidden] and `fc2_weight` [hidden, ffn].
    Like TE, the norm runs in fp32 and is rounded once to the input dtype, SiLU gates the first half of fc1's
    output, and `zero_centered_gamma` scales by `1 + weight`. Inside `reference_fp8_autocast` the inputs and
    weights of both GEMMs are rounded through e4m3 as `ReferenceTELinear` does.
    """

    def __init__(
        self,
        hidden_size: int,
        ffn_hidden_size: int,
        eps: float = 1e-5,
        *,
        bias: bool = True,
        normalization: str = "LayerNorm",
        activation: str = "gelu",
        zero_centered_gamma: bool = False,
        params_dtype: torch.dtype | None = None,
        device: torch.device | str | None = "cuda",
    ) -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("ffn_hidden_size", ffn_hidden_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        wanted = {
            "bias": (bias, False),
            "normalization": (normalization, "RMSNorm"),
            "activation": (activation, "swiglu"),
        }
        for name, (value, supported) in wanted.items():
            if value != supported:
                raise ValueError(f"ReferenceTELayerNormMLP supports {name}={supported!r} only, got {value!r}")
        dtype = params_dtype if params_dtype is not None else torch.get_default_dtype()
        self.eps, self.zero_centered_gamma = float(eps), bool(zero_centered_gamma)
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype, device=device))
        self.fc1_weight = nn.Parameter(
            torch.empty(2 * ffn_hidden_size, hidden_size, dtype=dtype, device=device)
        )
        self.fc2_weight = nn.Parameter(torch.empty(hidden_size, ffn_hidden_size, dtype=dtype, device=device))
        for weight in (self.fc1_weight, self.fc2_weight):
            nn.init.normal_(weight, std=0.02)
        self._weight_cache = _WeightCache()

    def forward(self, inp: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        x = inp.float()
        gamma = self.layer_norm_weight.float() + (1 if self.zero_centered_gamma else 0)
        normed = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * gamma).to(inp.dtype)
        fc1, fc2 = self.fc1_weight, self.fc2_weight
        fp8 = _ACTIVE_RECIPE.get() is not None
        if fp8:
            normed = _fake_e4m3(normed)
            fc1 = self._weight_cache("fc1_weight", fc1, is_first_microbatch)
            fc2 = self._weight_cache("fc2_weight", fc2, is_first_microbatch)
        gate, up = F.linear(normed, fc1).chunk(2, -1)
        hidden = F.silu(gate) * up
        return F.linear(_fake_e4m3(hidden) if fp8 else hidden, fc2)
