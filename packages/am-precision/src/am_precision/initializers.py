"""Build Linear / RMSNorm modules for a backend name ("torch", "torch_fp32", "te")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._args import check_bool, check_device, check_dtype, check_eps, check_positive_int
from .config import LINEAR_CHOICES, RMS_NORM_CHOICES
from .norms import Float32RMSNorm
from .te_lazy import load_te, patch_te_modules


def _device_kw(device: torch.device | str | None) -> dict[str, Any]:
    # TE's own default device is "cuda"; pass one only when the caller chose it.
    return {} if device is None else {"device": device}


def initialize_linear_module(
    linear_impl: str,
    in_features: int,
    out_features: int,
    bias: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """`nn.Linear` for "torch", `transformer_engine.pytorch.Linear` for "te" (TE patches applied first).

    Built on `device` (None: torch's default for "torch", TE's default for "te"); on the meta device, call
    `reset_parameters()` after materialising.
    """
    if linear_impl not in LINEAR_CHOICES:
        raise ValueError(f"unsupported linear_impl={linear_impl!r}; expected one of {list(LINEAR_CHOICES)}")
    check_positive_int(in_features, "in_features")
    check_positive_int(out_features, "out_features")
    check_bool(bias, "bias")
    check_device(device)
    check_dtype(dtype, "dtype")
    if linear_impl == "torch":
        return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=dtype)
    te = load_te()  # "te"
    patch_te_modules()
    return te.Linear(
        in_features=in_features,
        out_features=out_features,
        bias=bias,
        params_dtype=dtype,
        **_device_kw(device),
    )


def initialize_rms_norm_module(
    rms_norm_impl: str,
    dim: int,
    eps: float = 1e-5,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.bfloat16,
) -> nn.Module:
    """RMSNorm for a backend: "torch" (`nn.RMSNorm`, computes in the input dtype), "torch_fp32"
    (`Float32RMSNorm`, compiled fp32 math) or "te" (`transformer_engine.pytorch.RMSNorm`)."""
    if rms_norm_impl not in RMS_NORM_CHOICES:
        raise ValueError(
            f"unsupported rms_norm_impl={rms_norm_impl!r}; expected one of {list(RMS_NORM_CHOICES)}"
        )
    check_positive_int(dim, "dim")
    eps = check_eps(eps)
    check_device(device)
    check_dtype(dtype, "dtype")
    if rms_norm_impl == "torch":
        return nn.RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    if rms_norm_impl == "torch_fp32":
        return Float32RMSNorm(dim, eps=eps, device=device, dtype=dtype)
    te = load_te()  # "te"
    patch_te_modules()
    return te.RMSNorm(normalized_shape=dim, eps=eps, params_dtype=dtype, **_device_kw(device))


__all__ = ["initialize_linear_module", "initialize_rms_norm_module"]
