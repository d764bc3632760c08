"""`am doctor --bench`: a short packing benchmark on the local GPU: our packed varlen vs padded SDPA and vs
transformers' own position_ids packing on flex_attention; with liger-kernel installed also both with Liger,
and with transformer-engine too the README's fastest recipe (FP8 delayed scaling, norm + MLP as one TE
LayerNormMLP, fused q/k/v). The full comparison is `python -m benchmarks.packing`."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import math
import time
from collections.abc import Callable
from typing import Any

import torch

from .report import INFO, PASS, SKIP, Section

GOAL = 2.5  # the packing issue's goal for the full ~1B benchmark; the short run is indicative only


def _documents(n_tokens: int, seed: int = 0) -> list[int]:
    """Log-uniform document lengths in 128..4096 until `n_tokens` are reached."""
    generator = torch.Generator().manual_seed(seed)
    lengths: list[int] = []
    while sum(lengths) < n_tokens:
        u = torch.rand((), generator=generator).item()
        lengths.append(int(math.exp(math.log(128) + u * (math.log(4096) - math.log(128)))))
    return lengths


def _config():
    """An 8-layer, 1024-hidden Llama: the built-in tiny Llama's layout at benchmark size."""
    from .tiny_models import build_config

    return build_config(
        "llama",
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=8,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=8192,
    )


def _time_steps(model, batches, steps: int = 3, context: Callable[[], Any] = contextlib.nullcontext) -> float:
    """Seconds per pass over `batches` (forward+backward, the forward under `context()`), after a warm-up pass."""
    for rep in range(steps + 1):
        if rep == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        for batch in batches:
            with context():
                loss = model(**batch).loss
            loss.backward()
        model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def run_bench(n_tokens: int = 32768, row_length: int = 4096) -> dict[str, float]:
    from am_packing import configure_packing, pack_sequences, register_varlen_attention

    from .tiny_models import build_model

    device = torch.device("cuda")
    lengths = _documents(n_tokens)
    generator = torch.Generator().manual_seed(1)
    docs = [torch.randint(3, 32000, (n,), generator=generator).tolist() for n in lengths]
    # Padded baseline: one document per row, padded to the longest in its group of 8.
    padded = []
    for i in range(0, len(docs), 8):
        group = docs[i : i + 8]
        width = max(len(d) for d in group)
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros(len(group), width, dtype=torch.long)
        for r, d in enumerate(group):
            ids[r, : len(d)] = torch.tensor(d)
            mask[r, : len(d)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        padded.append(
            {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        )
    packed_rows = pack_sequences(docs, max_length=row_length)
    packed = [
        {k: v[i : i + 2].to(device) for k, v in packed_rows.items()}
        for i in range(0, packed_rows["input_ids"].shape[0], 2)
    ]
    # What transformers gives for free: the same rows as position_ids only (no mask) on flex_attention.
    native = [{k: b[k] for k in ("input_ids", "position_ids", "labels")} for b in packed]
    model = build_model(_config(), attn_implementation="sdpa").to(device, torch.bfloat16)
    t_padded = _time_steps(model, padded)
    model.set_attn_implementation("flex_attention")
    t_native = _time_steps(model, native)  # its warm-up pass pays flex's compile
    with register_varlen_attention(), configure_packing("torch_varlen"):
        model.set_attn_implementation("torch_varlen")
        t_packed = _time_steps(model, packed)
        model.set_attn_implementation("sdpa")
    tokens = float(sum(lengths))
    numbers = {
        "tokens": tokens,
        "padded_sdpa_tokens_per_s": tokens / t_padded,
        "native_flex_tokens_per_s": tokens / t_native,
        "packed_varlen_tokens_per_s": tokens / t_packed,
        "speedup": t_padded / t_packed,
        "vs_native_flex": t_native / t_packed,
    }
    if importlib.util.find_spec("liger_kernel") is not None:
        numbers |= {k: tokens / t for k, t in _with_liger(model, native, packed).items()}
    return numbers


QKV = ("q_proj", "k_proj", "v_proj")


def _with_liger(model, native: list[dict], packed: list[dict]) -> dict[str, float]:
    """Seconds per pass with Liger: HF-native flex, and (with transformer-engine) the fastest recipe."""
    import am_kernels
    import am_precision
    from am_packing import configure_packing, register_varlen_attention

    times = {}
    with contextlib.ExitStack() as undo:
        undo.callback(am_kernels.unpatch_liger_kernel, model)
        am_kernels.patch_liger_kernel(model)
        model.set_attn_implementation("flex_attention")
        times["native_flex_liger_tokens_per_s"] = _time_steps(model, native)
        if am_precision.HAVE_TE:
            undo.enter_context(am_precision.inject_te_mlp(model, recipe="delayed"))
            undo.enter_context(am_precision.inject_te_linear(model, recipe="delayed", fuse=[QKV]))
            undo.enter_context(register_varlen_attention())
            undo.enter_context(configure_packing("torch_varlen"))
            model.set_attn_implementation("torch_varlen")
            fp8 = functools.partial(am_precision.te_fp8_autocast, "delayed")
            times["fastest_recipe_tokens_per_s"] = _time_steps(model, packed, context=fp8)
        model.set_attn_implementation("sdpa")
    return times


def bench_section() -> Section:
    section = Section(
        "bench",
        "Packing benchmark (short): packed torch varlen vs padded SDPA and HF-native flex packing, bf16 training",
        ["measure", "value"],
    )
    if not torch.cuda.is_available():
        section.add(SKIP, measure="benchmark", value="needs a CUDA GPU; nothing was measured")
        return section
    numbers = run_bench()
    for key in (
        "tokens",
        "padded_sdpa_tokens_per_s",
        "native_flex_tokens_per_s",
        "packed_varlen_tokens_per_s",
        "native_flex_liger_tokens_per_s",
        "fastest_recipe_tokens_per_s",
    ):
        if key in numbers:
            section.add(INFO, measure=key, value=round(numbers[key]))
    ok = numbers["speedup"] >= GOAL
    section.add(PASS if ok else INFO, measure="speedup (packed / padded)", value=f"{numbers['speedup']:.2f}x")
    section.add(
        PASS if numbers["vs_native_flex"] >= 1.0 else INFO,
        measure="ours / HF-native flex (position_ids packing)",
        value=f"{numbers['vs_native_flex']:.2f}x",
    )
    if "fastest_recipe_tokens_per_s" in numbers:
        ratio = numbers["fastest_recipe_tokens_per_s"] / numbers["native_flex_liger_tokens_per_s"]
        section.add(
            PASS if ratio >= 1.0 else INFO,
            measure="fastest recipe (FP8) / HF-native flex + Liger",
            value=f"{ratio:.2f}x",
        )
        # Measured on an H200: 0.60x here, 1.16-1.23x at ~1B (2048 hidden, 16 layers, 4 x 4096 rows).
        section.notes.append(
            "FP8 pays where GEMMs dominate: at this size TE's per-call host time bounds the step; "
            "the README's table is a ~1B model"
        )
    else:
        why = "liger-kernel" if "native_flex_liger_tokens_per_s" not in numbers else "transformer-engine"
        section.add(SKIP, measure="fastest recipe (FP8)", value=f"needs {why}; not measured")
    section.notes.append(f"{torch.cuda.get_device_name(0)}; 8-layer 1024-hidden Llama; goal ≥ {GOAL}x")
    return section
