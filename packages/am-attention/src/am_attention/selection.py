"""Attention-backend selection: defaults, fallbacks and parallelism-driven overrides.

Pure functions; nothing here imports an optional kernel or patches anything.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_ATTN_IMPLEMENTATION",
    "PACKED_SEQUENCE_BACKENDS",
    "apply_preload_overrides",
    "next_fallback_attn",
    "verify_sdpa_support",
]

# find_spec only locates the package; importing flash_attn could initialise CUDA.
HAS_FLASH_ATTN: bool = importlib.util.find_spec("flash_attn") is not None

#: What a model gets when the user names nothing: flash-attention 2 when installed, else torch SDPA.
DEFAULT_ATTN_IMPLEMENTATION: str = "flash_attention_2" if HAS_FLASH_ATTN else "sdpa"

#: Lowest to highest priority; `next_fallback_attn` steps one place to the left.
ATTN_PRIORITY: tuple[str, ...] = (
    "eager",
    "sdpa",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
)

#: Backends for which am-packing makes a packed batch exact (same numbers as one document at a time).
#: Kept as data so that a new am-packing backend is one line here; am-attention never imports am-packing.
PACKED_SEQUENCE_BACKENDS: tuple[str, ...] = (
    "eager",
    "sdpa",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "torch_varlen",
    "te",
)

#: Backends that run their own context-parallel dispatch and masking; never overridden here.
SELF_MASKING_BACKENDS: tuple[str, ...] = ("magi",)


def next_fallback_attn(attn_implementation: str) -> str:
    """The next lower implementation in `ATTN_PRIORITY` ("eager" stays "eager"; unknown names give "eager")."""
    if not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a str, got {attn_implementation!r}")
    if attn_implementation in ATTN_PRIORITY:
        pos = ATTN_PRIORITY.index(attn_implementation)
        return ATTN_PRIORITY[max(0, pos - 1)]
    return ATTN_PRIORITY[0]


def _check_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_flag(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def apply_preload_overrides(
    tp_size: int,
    cp_size: int,
    has_packed_sequence: bool,
    attn_implementation: str,
    use_liger_kernel: bool,
) -> tuple[str, bool]:
    """Final `(attn_implementation, use_liger_kernel)` given TP/CP sizes and whether batches are packed.

    Rules: TP or CP > 1 disables Liger; CP > 1 forces "sdpa" (the only backend our context
    parallelism shards); packed batches with CP > 1 raise `ValueError`. Packed batches with CP == 1
    keep any backend in `PACKED_SEQUENCE_BACKENDS`; another backend steps down `ATTN_PRIORITY`
    until it reaches one that is (an unknown name lands on "eager").
    """
    tp_size = _check_size("tp_size", tp_size)
    cp_size = _check_size("cp_size", cp_size)
    has_packed_sequence = _check_flag("has_packed_sequence", has_packed_sequence)
    use_liger_kernel = _check_flag("use_liger_kernel", use_liger_kernel)
    if not isinstance(attn_implementation, str):
        raise TypeError(f"attn_implementation must be a str, got {attn_implementation!r}")
    if tp_size > 1 or cp_size > 1:
        if use_liger_kernel:
            logger.info("Disabling Liger kernel with TP (%d) or CP (%d)", tp_size, cp_size)
        use_liger_kernel = False
    if attn_implementation in SELF_MASKING_BACKENDS:
        return attn_implementation, use_liger_kernel
    if cp_size > 1:
        if has_packed_sequence:
            raise ValueError(
                f"packed sequences are supported only with cp_size == 1, got cp_size={cp_size}; "
                "disable packing or context parallelism"
            )
        if attn_implementation != "sdpa":
            logger.warning(
                "Context parallelism (cp_size=%d) needs SDPA; attn_implementation %r -> 'sdpa'",
                cp_size,
                attn_implementation,
            )
        return "sdpa", use_liger_kernel
    if has_packed_sequence:
        chosen = attn_implementation
        while chosen not in PACKED_SEQUENCE_BACKENDS:
            chosen = next_fallback_attn(chosen)
        if chosen != attn_implementation:
            logger.warning(
                "attn_implementation %r cannot run packed sequences exactly; using %r (allowed: %s)",
                attn_implementation,
                chosen,
                ", ".join(PACKED_SEQUENCE_BACKENDS),
            )
        attn_implementation = chosen
    return attn_implementation, use_liger_kernel


def verify_sdpa_support(model: Any, cp_size: int) -> None:
    """Raise `ValueError` when context parallelism is requested (cp_size > 1) and the model lacks SDPA support."""
    cp_size = _check_size("cp_size", cp_size)
    if cp_size > 1 and getattr(model, "_supports_sdpa", False) is not True:
        raise ValueError(
            f"model {type(model).__name__} does not support SDPA (_supports_sdpa is not True), "
            f"which context parallelism (cp_size={cp_size}) requires"
        )
