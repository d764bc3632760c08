"""Argument checks shared by the public functions: a TypeError or ValueError that names the argument.

Bad input never reaches torch or transformers, where it would surface as an AttributeError, a weakref
error or a NaN several calls later.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import nn


def _show(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


def check_model(model: object, argument: str = "model") -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{argument} must be a torch.nn.Module, got {_show(model)}")
    return model


def check_dtype(dtype: object, argument: str) -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(
            f"{argument} must be a floating torch.dtype (e.g. torch.bfloat16), got {_show(dtype)}"
        )
    return dtype


def check_tensor(value: object, argument: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{argument} must be a torch.Tensor, got {_show(value)}")
    return value


def check_bool(value: object, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{argument} must be True or False, got {_show(value)}")
    return value


def check_positive_int(value: object, argument: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{argument} must be a positive int, got {_show(value)}")
    if value <= 0:
        raise ValueError(f"{argument} must be a positive int, got {value!r}")
    return value


def check_eps(eps: object, argument: str = "eps") -> float:
    """A non-negative finite real number as a float (a negative eps makes RMSNorm return NaN)."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"{argument} must be a non-negative float, got {_show(eps)}")
    value = float(eps)
    if not math.isfinite(value) or value < 0.0:
        raise ValueError(f"{argument} must be a non-negative finite float, got {eps!r}")
    return value


def check_device(device: object, argument: str = "device") -> Any:
    """None, a torch.device, a device string or a device index, validated by torch.device itself."""
    if device is None or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, int)):
        raise TypeError(f"{argument} must be None, a torch.device, a str or an int, got {_show(device)}")
    try:
        torch.device(device)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ValueError(f"{argument}={device!r} is not a device: {exc}") from None
    return device
