"""am-attention: backend resolution per request and the TE injection plan."""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

from am_attention import (
    PACKED_SEQUENCE_BACKENDS,
    apply_preload_overrides,
    next_fallback_attn,
    plan_te_attention,
)

from ..report import FAIL, INFO, PASS, Section
from ._models import meta_model

REQUESTS = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "torch_varlen", "te")


def _runnable(impl: str) -> tuple[bool, str]:
    """Whether `impl` can run here, and why not."""
    cuda = torch.cuda.is_available()
    if impl in ("flash_attention_2", "flash_attention_3"):
        module = "flash_attn" if impl == "flash_attention_2" else "flash_attn_interface"
        if importlib.util.find_spec(module) is None:
            return False, f"{module} not installed"
        return (True, "") if cuda else (False, "needs CUDA")
    if impl == "torch_varlen":
        return (True, "") if cuda else (False, "torch varlen attention has no CPU kernel")
    if impl == "te":
        if importlib.util.find_spec("transformer_engine") is None:
            return True, "transformer-engine absent: the SDPA reference kernel runs"
        return (True, "") if cuda else (False, "needs CUDA")
    return True, ""


def resolve(impl: str, packed: bool) -> tuple[str, str]:
    """The backend a request resolves to here (packing rules, then what can run), with the reason."""
    chosen, _ = apply_preload_overrides(1, 1, packed, impl, False)
    reasons = [] if chosen == impl else [f"{impl} cannot pack exactly → {chosen}"]
    runnable, why = _runnable(chosen)
    while not runnable:
        fallback = (
            next_fallback_attn(chosen) if chosen in ("flash_attention_2", "flash_attention_3") else "sdpa"
        )
        reasons.append(f"{why} → {fallback}")
        chosen = fallback
        runnable, why = _runnable(chosen)
    if why:
        reasons.append(why)
    return chosen, "; ".join(reasons) or "runs here"


def check_selection(config: Any) -> Section:
    section = Section(
        "attention_selection",
        "Attention backend each request resolves to",
        ["requested", "plain batch", "packed batch", "why"],
    )
    for impl in REQUESTS:
        plain, why_plain = resolve(impl, packed=False)
        packed, why_packed = resolve(impl, packed=True)
        ok = packed in PACKED_SEQUENCE_BACKENDS
        why = why_plain if why_plain == why_packed else f"plain: {why_plain}; packed: {why_packed}"
        section.add(
            PASS if ok else FAIL, requested=impl, **{"plain batch": plain, "packed batch": packed}, why=why
        )
    section.notes.append(
        f"packed batches stay on any backend am-packing makes exact: {', '.join(PACKED_SEQUENCE_BACKENDS)}"
    )
    return section


def check_te_plan(config: Any) -> Section:
    section = Section(
        "te_attention", "Transformer Engine attention injection plan", ["module", "taken", "reason"]
    )
    plan = plan_te_attention(meta_model(config))
    if not plan:
        section.add(FAIL, module="(none)", taken=False, reason="no attention module found")
    for name, taken, reason in plan:
        section.add(
            PASS if taken else INFO, module=name, taken="yes" if taken else "falls back", reason=reason
        )
    taken = sum(1 for _, t, _ in plan if t)
    section.notes.append(
        f"{taken} of {len(plan)} attention layers would run TE; the rest keep the original SDPA"
    )
    return section
