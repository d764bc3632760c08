"""RMSNorm computed in fp32 whatever the input dtype, compiled with torch.compile where available.

The compiled path is shape-agnostic: a training run with a new sequence length (or batch size, or a
norm of another width, or a 4D per-head input) on every step never recompiles. Dynamo guards on
everything it sees about an input, including the base of a view (``q_proj(x).view(B, S, H, D)`` carries
its 3D base along) and the autograd state, so the compiled kernels only ever see plain, detached,
contiguous 2D ``[rows, dim]`` tensors. Autograd is a `torch.autograd.Function` whose forward and
backward are the two compiled kernels (the backward is the closed form of the fp32 math). Each
(input dtype, weight dtype) pair gets its own copy of the kernels' code, so dynamo's per-code recompile
limit (8) counts only that pair's graphs: a dynamic-shape graph and the one-row specialisation.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._args import check_device, check_dtype, check_eps, check_positive_int, check_tensor

_DISABLE_ENV = "AM_PRECISION_DISABLE_COMPILE"
# The torch.compile backend of the compiled kernels (tests use "eager"/"aot_eager" to check guards fast).
_BACKEND = "inductor"


def float32_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Eager fp32 RMSNorm: upcast `x`, normalise in fp32, scale by `weight` (upcast), cast back to `x.dtype`."""
    if not torch.compiler.is_compiling():  # inside a traced graph the arguments are the tracer's
        check_tensor(x, "x")
        check_tensor(weight, "weight")
        check_eps(eps)
    input_dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * h).to(input_dtype)


def _forward_2d(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x.float()
    rstd = torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return (weight.float() * (h * rstd)).to(x.dtype), rstd


def _backward_2d(
    grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # y = w * n, n = h * rstd: dn/dh = rstd * (I - n n^T / dim), so dx = rstd * (g - n * mean(g * n)).
    normed = x.float() * rstd
    g = grad.float() * weight.float()
    grad_x = rstd * (g - normed * (g * normed).mean(-1, keepdim=True))
    grad_w = (grad.float() * normed).sum(0)
    return grad_x.to(x.dtype), grad_w.to(weight.dtype)


@functools.cache
def _kernel(fn: Callable[..., Any], x_dtype: torch.dtype, w_dtype: torch.dtype, backend: str) -> Any:
    # A copy of the code object per dtype pair: dynamo keeps its cache (and recompile limit) per code object.
    tag = f"{str(x_dtype).removeprefix('torch.')}_{str(w_dtype).removeprefix('torch.')}"
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{tag}", co_qualname=f"{fn.__qualname__}_{tag}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    return torch.compile(copy, fullgraph=True, dynamic=True, backend=backend)


def _plain(t: torch.Tensor) -> torch.Tensor:
    # detach() of a view is not a view: dynamo then guards on this tensor alone, not on a base.
    return t.contiguous().detach()


class _CompiledRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = _plain(x.reshape(-1, x.shape[-1]))
        w = _plain(weight)
        y, rstd = _kernel(_forward_2d, x.dtype, weight.dtype, _BACKEND)(x2, w, eps)
        ctx.save_for_backward(x2, w, rstd)
        ctx.x_shape = x.shape
        return y.view(x.shape)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        x2, w, rstd = ctx.saved_tensors
        g2 = _plain(grad.reshape(-1, x2.shape[-1]))
        grad_x, grad_w = _kernel(_backward_2d, x2.dtype, w.dtype, _BACKEND)(g2, x2, w, rstd)
        return grad_x.view(ctx.x_shape), grad_w, None


def compile_unavailable_reason() -> str | None:
    """Why `Float32RMSNorm` runs eagerly instead of compiled (None when compiling is possible)."""
    if os.environ.get(_DISABLE_ENV, "") not in ("", "0"):
        return f"{_DISABLE_ENV} is set"
    import torch._dynamo  # imported here: loading dynamo costs ~1 s and importing us must stay cheap

    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    return None


class Float32RMSNorm(nn.Module):
    """RMSNorm with fp32 computation; the weight stays in the model dtype (e.g. bf16) for FSDP2.

    The input is upcast to fp32, normalised and scaled in fp32, and cast back to the input dtype.
    `eps` must be a non-negative finite float (ValueError otherwise: a negative one gives NaN).
    `use_compile`: None compiles when torch.compile is usable and falls back to the same math eagerly
    otherwise (reason in `compile_unavailable_reason()`); True requires compile
    (RuntimeError if unavailable); False always runs eagerly. The compiled path never recompiles for a new
    input shape (see the module docstring). Inside an outer torch.compile region, on meta tensors and on
    tensor subclasses (DTensor), the eager function is used (the outer graph traces it).
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
        check_positive_int(dim, "dim")
        check_dtype(dtype, "dtype")
        check_device(device)
        if use_compile is not None and not isinstance(use_compile, bool):
            raise ValueError(f"use_compile must be None, True or False, got {use_compile!r}")
        self.eps = check_eps(eps)
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
        w = self.weight
        if x.dim() == 0 or x.shape[-1] != w.shape[-1]:
            raise ValueError(
                f"Float32RMSNorm({w.shape[-1]}) got an input of shape {tuple(x.shape)}; expected [..., {w.shape[-1]}]"
            )
        if (
            x.is_meta
            or x.numel() == 0
            or type(x) is not torch.Tensor
            or type(w) not in (torch.Tensor, nn.Parameter)
            or torch.compiler.is_compiling()
            or not self.runs_compiled()
        ):
            return float32_rms_norm(x, w, self.eps)
        return _CompiledRMSNorm.apply(x, w, self.eps)


__all__ = ["Float32RMSNorm", "compile_unavailable_reason", "float32_rms_norm"]
