"""Argument checks for the public functions: TypeError/ValueError naming the function and the argument."""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn


def require_module(value: Any, function: str, argument: str = "model") -> nn.Module:
    """`value` when it is a torch.nn.Module, else TypeError naming `function` and its `argument`."""
    if not isinstance(value, nn.Module):
        raise TypeError(f"{function}: {argument} must be a torch.nn.Module, got {type(value).__name__}")
    return value


def require_int(value: Any, function: str, argument: str, *, minimum: int | None = None) -> int:
    """`value` as an int (bool refused), at least `minimum` when given."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{function}: {argument} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{function}: {argument} must be >= {minimum}, got {value}")
    return value


def require_bool(value: Any, function: str, argument: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{function}: {argument} must be a bool, got {value!r} ({type(value).__name__})")
    return value


def require_device(value: Any, function: str, argument: str = "device") -> torch.device:
    """`value` as a torch.device (a device, a string such as "cpu"/"cuda:1", or a CUDA index)."""
    if isinstance(value, bool) or not isinstance(value, (torch.device, str, int)):
        raise TypeError(f"{function}: {argument} must be a torch.device or str, got {type(value).__name__}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as exc:  # torch's own message names no argument
        raise ValueError(f"{function}: {argument}={value!r} is not a device ({exc})") from exc
