"""RMSNorm computed in fp32 whatever the input dtype, compiled with torch.compile where available."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
from torch import nn

_DISABLE_ENV = "AM_PRECISION_DISABLE_COMPILE"


def float32_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eager fp32 RMSNorm: upcast `x`, normalise in fp32, scale by `weight` (upcast), cast back to `x.dtype`."""
    input_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(input_dtype)


def compile_unavailable_reason() -> str | None:
    """Why `Float32RMSNorm` runs eagerly instead of compiled (None when compiling is possible)."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return f"{_DISABLE_ENV} is set"
    import torch._dynamo  # imported here: loading dynamo costs ~1 s and importing us must stay cheap

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    return None


@functools.cache
def _compiled() -> Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]:
    # A standalone function (not the module's forward) keeps dynamo's guards to three arguments;
    # dynamic=True avoids a recompile for every new token count.
    return torch.compile(float32_rms_norm, fullgraph=True, dynamic=True)


class Float32RMSNorm(nn.Module):
    """RMSNorm with fp32 computation; the weight stays in the model dtype (e.g. bf16) for FSDP2.

    The input is upcast to fp32, normalised and scaled in fp32, and cast back to the input dtype.
    `use_compile`: None compiles when torch.compile is usable and falls back to the same math eagerly
    otherwise (reason in `compile_unavailable_reason()`); True requires compile (RuntimeError if
    unavailable); False always runs eagerly. Inside an outer torch.compile region, or on meta tensors,
    the eager function is used (the outer graph traces it).
    """

    def __init__(
        self,
        dim: int,
        eps: float = 1e-5,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.bfloat16,
        *,
        use_compile: bool | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if use_compile not in (None, True, False):
            raise ValueError(f"use_compile must be None, True or False, got {use_compile!r}")
        self.eps = float(eps)
        self.use_compile = use_compile
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, use_compile={self.use_compile}"

    def runs_compiled(self) -> bool:
        """Whether forward uses the compiled function (for an input that is neither meta nor traced)."""
        if self.use_compile is False:
            return False
        reason = compile_unavailable_reason()
        if reason is not None and self.use_compile:
            raise RuntimeError(f"Float32RMSNorm(use_compile=True) but torch.compile is unavailable: {reason}")
        return reason is None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_meta or torch.compiler.is_compiling() or not self.runs_compiled():
            return float32_rms_norm(x, self.weight, self.eps)
        return _compiled()(x, self.weight, self.eps)


__all__ = ["Float32RMSNorm", "compile_unavailable_reason", "float32_rms_norm"]
