"""Calls that `torch.compile` leaves out of its graphs: the swapped TE modules.

Dynamo cannot trace Transformer Engine's modules (TE 2.20: its autograd functions' fake-tensor shapes do
not match what they return, and the FP8 state they keep is Python-side), and our fused groups cache their
input by identity. A model compiled per decoder layer therefore calls them eagerly, between its graphs:
one graph break on each side, the rest of the layer (norms, rope, attention, residuals) compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import torch

T = TypeVar("T")


@torch.compiler.disable
def run_eager(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`fn(*args, **kwargs)`, run by Python even inside a compiled frame."""
    return fn(*args, **kwargs)
