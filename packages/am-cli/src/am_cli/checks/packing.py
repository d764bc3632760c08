"""am-packing: packed vs unpacked logits, per attention backend available here."""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterator
from typing import Any

import torch

from am_packing import configure_packing, pack_sequences, register_varlen_attention

from ..report import FAIL, PASS, SKIP, Section
from ._models import real_model, text_vocab

# Document lengths straddle the tiny models' sliding window (8), so windows are exercised too.
DOC_LENGTHS = (5, 13, 9)
# fp32 logits of a packed row and of the documents alone differ only by summation order.
FP32_TOLERANCE = 1e-4
# CUDA-only varlen kernels (torch varlen, flash-attn) take bf16 only: bf16 has 8 bits of mantissa
# (eps 7.8e-3), and the tiny models' logits stay below ~1, so a few roundings per layer stay under 2e-2.
BF16_TOLERANCE = 2e-2
CUDA_ONLY = ("torch_varlen", "flash_attention_2")


def backends_here() -> list[tuple[str, str | None]]:
    """(backend, reason it cannot run here or None)."""
    cuda = torch.cuda.is_available()
    flash = importlib.util.find_spec("flash_attn") is not None
    return [
        ("eager", None),
        ("sdpa", None),
        ("flex_attention", None),
        ("torch_varlen", None if cuda else "torch varlen attention has no CPU kernel"),
        ("flash_attention_2", None if (cuda and flash) else "needs CUDA and flash-attn"),
        ("te", None if cuda or importlib.util.find_spec("transformer_engine") is None else "TE needs CUDA"),
    ]


def documents(vocab: int, lengths: tuple[int, ...] = DOC_LENGTHS, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=generator).tolist() for n in lengths]


@contextlib.contextmanager
def packed_backend(model: torch.nn.Module, backend: str) -> Iterator[torch.nn.Module]:
    """`model` set up to run packed batches on `backend`; every patch is undone on exit."""
    with contextlib.ExitStack() as stack:
        if backend == "te":
            from am_attention import ReferenceDotProductAttention, inject_te_attention

            cls = None if importlib.util.find_spec("transformer_engine") else ReferenceDotProductAttention
            stack.enter_context(inject_te_attention(model, dot_product_attention_cls=cls))
        else:
            if backend == "torch_varlen":
                stack.enter_context(register_varlen_attention())
            model.set_attn_implementation(backend)
        stack.enter_context(configure_packing(backend))  # the handle's exit is the one undo
        yield model


def unsupported_reason(model: torch.nn.Module, backend: str) -> str | None:
    """Why transformers refuses `backend` for this model class (e.g. no flex support), or None."""
    if backend in ("te", "torch_varlen"):
        return None
    try:
        model.set_attn_implementation(backend)
    except (ValueError, ImportError) as exc:
        return str(exc).split(". ")[0]
    finally:
        model.set_attn_implementation("sdpa")
    return None


def packed_vs_unpacked(
    config: Any, backend: str, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> float:
    """Max |logits(packed row) - logits(each document alone)| for `backend`."""
    model = real_model(config).to(device, dtype).eval()
    docs = documents(text_vocab(config))
    batch = pack_sequences(docs, max_length=sum(DOC_LENGTHS) + 2)
    with torch.no_grad():
        alone = [model(input_ids=torch.tensor([d], device=device)).logits[0] for d in docs]
        with packed_backend(model, backend):
            packed = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                position_ids=batch["position_ids"].to(device),
            ).logits[0]
    diff, start = 0.0, 0
    for logits in alone:
        n = logits.shape[0]
        diff = max(diff, (packed[start : start + n].float() - logits.float()).abs().max().item())
        start += n
    return diff


def _te_import_error() -> str | None:
    """Why an installed transformer-engine cannot be imported, or None when it imports."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"transformer_engine is installed but does not import: {type(exc).__name__}: {str(exc)[:200]}"
    return None


def check_packing(config: Any) -> Section:
    section = Section(
        "packing",
        "Packed vs unpacked logits (one packed row vs each document alone)",
        ["backend", "max |Δ logits|", "detail"],
    )
    for backend, why_not in backends_here():
        why_not = why_not or unsupported_reason(real_model(config), backend)
        if why_not:
            section.add(SKIP, backend=backend, **{"max |Δ logits|": None}, detail=why_not)
            continue
        real_te = backend == "te" and importlib.util.find_spec("transformer_engine") is not None
        broken = real_te and _te_import_error()
        if broken:  # installed but unusable (e.g. a cuDNN it was not built against): say so, run the rest
            section.add(FAIL, backend=backend, **{"max |Δ logits|": None}, detail=broken)
            continue
        if backend in CUDA_ONLY or real_te:
            diff, tolerance = packed_vs_unpacked(config, backend, "cuda", torch.bfloat16), BF16_TOLERANCE
            detail = f"documents {list(DOC_LENGTHS)}; CUDA bf16, tolerance {tolerance:g}"
        else:
            diff, tolerance = packed_vs_unpacked(config, backend), FP32_TOLERANCE
            detail = f"documents {list(DOC_LENGTHS)}; fp32, tolerance {tolerance:g}"
        ok = diff <= tolerance
        if backend == "te" and not importlib.util.find_spec("transformer_engine"):
            detail += "; SDPA reference kernel (transformer-engine absent)"
        section.add(PASS if ok else FAIL, backend=backend, **{"max |Δ logits|": diff}, detail=detail)
    return section
