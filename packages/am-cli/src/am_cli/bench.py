"""`am doctor --bench`: a short packing benchmark on the local GPU: our packed varlen vs padded SDPA and vs
transformers' own position_ids packing on flex_attention (the full comparison is `python -m benchmarks.packing`)."""

from __future__ import annotations

import math
import time

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


def _time_steps(model, batches, steps: int = 3) -> float:
    """Seconds per pass over `batches` (forward+backward), after one warm-up pass."""
    for rep in range(steps + 1):
        if rep == 1:
            torch.cuda.synchronize()
            start = time.perf_counter()
        for batch in batches:
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
    return {
        "tokens": tokens,
        "padded_sdpa_tokens_per_s": tokens / t_padded,
        "native_flex_tokens_per_s": tokens / t_native,
        "packed_varlen_tokens_per_s": tokens / t_packed,
        "speedup": t_padded / t_packed,
        "vs_native_flex": t_native / t_packed,
    }


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
    ):
        section.add(INFO, measure=key, value=round(numbers[key]))
    ok = numbers["speedup"] >= GOAL
    section.add(PASS if ok else INFO, measure="speedup (packed / padded)", value=f"{numbers['speedup']:.2f}x")
    section.add(
        PASS if numbers["vs_native_flex"] >= 1.0 else INFO,
        measure="ours / HF-native flex (position_ids packing)",
        value=f"{numbers['vs_native_flex']:.2f}x",
    )
    section.notes.append(f"{torch.cuda.get_device_name(0)}; 8-layer 1024-hidden Llama; goal ≥ {GOAL}x")
    return section
