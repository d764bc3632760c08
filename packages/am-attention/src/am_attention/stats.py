"""Dispatch counters of the TE attention path: a plain dict of ints.

Only eager code counts: under torch.compile the "te" call runs outside the graph (see `te_backend`), so
the counters never become guards or graph inputs.
"""

from __future__ import annotations

__all__ = ["get_te_attention_stats", "reset_te_attention_stats"]

#: te_hits: calls that ran the DotProductAttention kernel in BSHD; te_thd_hits: of those, packed THD calls;
#: fallback_*: calls that ran the original SDPA instead, by reason.
STAT_KEYS: tuple[str, ...] = (
    "te_hits",
    "te_thd_hits",
    "fallback_mask",
    "fallback_scale_mismatch",
    "fallback_dropout",
    "fallback_window_mismatch",
    "fallback_shape",
    "fallback_inputs",
    "fallback_sinks",
    "fallback_not_injected",
)

_TE_STATS: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)


def count(key: str) -> None:
    _TE_STATS[key] += 1


def get_te_attention_stats() -> dict[str, int]:
    """A snapshot of the TE dispatch counters (keys in `STAT_KEYS`)."""
    return dict(_TE_STATS)


def reset_te_attention_stats() -> None:
    """Zero the TE dispatch counters."""
    for key in STAT_KEYS:
        _TE_STATS[key] = 0
