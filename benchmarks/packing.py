"""am-packing GPU benchmark: packed (torch_varlen, flex) vs padded SDPA training throughput, cu_seqlens
prep vs the seed's per-document loop, varlen attention TFLOP/s, and host syncs in the attention path.

    python -m benchmarks.packing [--smoke] [--out FILE]

--smoke runs a tiny CPU-capable version that only proves the script executes: its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def log_uniform_lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g)
    return [int(v) for v in torch.exp(math.log(lo) + u * (math.log(hi) - math.log(lo))).round().tolist()]


def timer(device: str):
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def begin():
            start.record()

        def stop() -> float:
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / 1000

        return begin, stop
    box = {}

    def begin_cpu():
        box["t"] = time.perf_counter()

    def stop_cpu() -> float:
        return time.perf_counter() - box["t"]

    return begin_cpu, stop_cpu


def seed_loop_unpad(mask: torch.Tensor):
    """The seed's approach: per-row, per-document Python loop with .item() calls."""
    seqlens = []
    for row in mask:
        for doc in torch.unique(row):
            if int(doc) == 0:
                continue
            seqlens.append(int((row == doc).sum().item()))
    seqlens_t = torch.tensor(seqlens, dtype=torch.int32, device=mask.device)
    indices = torch.nonzero(mask.flatten() > 0).flatten()
    cu = F.pad(seqlens_t.cumsum(0, dtype=torch.int32), (1, 0))
    return indices, cu, int(seqlens_t.max().item())


def train_steps(model, batches, device, iters_warm=1):
    begin, stop = timer(device)
    for b in batches[:iters_warm]:
        model(**b).loss.backward()
    model.zero_grad(set_to_none=True)
    begin()
    for b in batches:
        model(**b).loss.backward()
    t = stop()
    model.zero_grad(set_to_none=True)
    return t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/packing.json")
    ap.add_argument("--skip-flex", action="store_true")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, LlamaConfig

    import am_packing
    from am_packing import (
        backends,
        configure_packing,
        get_unpad_data,
        pack_sequences,
        register_varlen_attention,
    )
    from am_packing._patch import ItemPatch, PatchSet

    device = "cuda" if torch.cuda.is_available() and not args.smoke else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.smoke:
        print("SMOKE RUN: tiny model on", device, "- numbers mean nothing")
        cfg = dict(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=256
        )
        lo, hi, max_len, n_docs = 8, 64, 64, 24
    else:
        cfg = dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=16,
            intermediate_size=5632,
            vocab_size=32000,
        )
        lo, hi, max_len, n_docs = 128, 4096, 4096, 96
    config = LlamaConfig(
        **cfg, num_key_value_heads=cfg["num_attention_heads"], max_position_embeddings=max_len
    )
    results: dict[str, float | str | int] = {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu"
    }
    lengths = log_uniform_lengths(n_docs, lo, hi)
    g = torch.Generator().manual_seed(1)
    docs = [torch.randint(1, cfg["vocab_size"], (n,), generator=g).tolist() for n in lengths]
    real_tokens = sum(lengths)
    results["real_tokens"] = real_tokens

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype).to(device)
    model.config.use_cache = False
    model.train()

    # ---- packed: rows of max_len, 4 rows per step (equal token budget to the padded run: the same documents)
    rows_per_step = 4
    packed = pack_sequences(docs, max_len, return_cu_seqlens=False)
    results["packing_efficiency"] = am_packing.packing_efficiency(packed)
    packed_batches = []
    for s in range(0, packed["input_ids"].shape[0], rows_per_step):
        sub = {k: v[s : s + rows_per_step].to(device) for k, v in packed.items()}
        packed_batches.append(sub)
    # ---- padded SDPA: 4 documents per step padded to the longest, with a 0/1 padding mask
    padded_batches = []
    for s in range(0, len(docs), rows_per_step):
        group = docs[s : s + rows_per_step]
        width = max(map(len, group))
        ids = torch.zeros(len(group), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, d in enumerate(group):
            ids[i, : len(d)] = torch.tensor(d)
            mask[i, : len(d)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        padded_batches.append(
            {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}
        )
    results["padded_slots"] = sum(b["input_ids"].numel() for b in padded_batches)

    t_padded = train_steps(model, padded_batches, device)
    results["padded_sdpa_tokens_per_s"] = real_tokens / t_padded
    print(f"padded sdpa      : {real_tokens / t_padded:12.0f} tok/s")

    with register_varlen_attention(), configure_packing("torch_varlen"):
        if device == "cuda":
            model.set_attn_implementation("torch_varlen")
            t_varlen = train_steps(model, packed_batches, device)
            results["packed_varlen_tokens_per_s"] = real_tokens / t_varlen
            results["speedup_varlen_vs_padded"] = t_padded / t_varlen
            print(
                f"packed varlen    : {real_tokens / t_varlen:12.0f} tok/s  ({t_padded / t_varlen:.2f}x padded)"
            )

            # host syncs inside attention: run the attention function under sync debug mode "error"
            def checked(*a, **k):
                torch.cuda.set_sync_debug_mode("error")
                try:
                    return backends.varlen_attention_forward(*a, **k)
                finally:
                    torch.cuda.set_sync_debug_mode(0)

            import transformers

            with PatchSet(
                [ItemPatch(transformers.AttentionInterface._global_mapping, "torch_varlen", checked)]
            ):
                try:
                    model(**packed_batches[0]).loss.backward()
                    results["attention_host_syncs_per_layer"] = 0
                    print("host syncs in attention path per layer: 0 (sync debug mode 'error' did not fire)")
                except RuntimeError as exc:
                    results["attention_host_syncs_per_layer"] = f"sync detected: {exc}"[:300]
                    print("SYNC DETECTED in attention path:", exc)
            model.zero_grad(set_to_none=True)
        else:
            results["packed_varlen_tokens_per_s"] = "skipped: no CUDA (varlen_attn has no CPU kernel)"
    if not args.skip_flex:
        with configure_packing("flex_attention"):
            model.set_attn_implementation("flex_attention")
            if device == "cpu":
                import transformers.integrations.flex_attention as fa
                from torch.nn.attention.flex_attention import flex_attention

                fa.compile_friendly_flex_attention = lambda q, k, v, training=False, **kw: flex_attention(
                    q, k, v, **kw
                )
                # (smoke only: CPU has no flex backward; forward-only timing)
                begin, stop = timer(device)
                with torch.no_grad():
                    begin()
                    for b in packed_batches:
                        model(**b)
                    t_flex = stop()
            else:
                t_flex = train_steps(model, packed_batches, device, iters_warm=2)
            results["packed_flex_tokens_per_s"] = real_tokens / t_flex
            results["speedup_flex_vs_padded"] = t_padded / t_flex
            print(f"packed flex      : {real_tokens / t_flex:12.0f} tok/s  ({t_padded / t_flex:.2f}x padded)")
    model.set_attn_implementation("sdpa")

    # ---- cu_seqlens prep: ours vs the seed's per-document loop (same mask, same device)
    big = pack_sequences(docs * (1 if args.smoke else 4), max_len)["attention_mask"].to(device)
    ref = seed_loop_unpad(big)
    ours = get_unpad_data(big)
    assert ours.cu_seqlens.tolist() == ref[1].tolist() and ours.max_seqlen == ref[2]
    begin, stop = timer(device)
    reps = 5
    begin()
    for _ in range(reps):
        seed_loop_unpad(big)
    t_seed = stop() / reps
    begin()
    for _ in range(reps):
        get_unpad_data(big)
    t_ours = stop() / reps
    results["cu_seqlens_seed_loop_ms"] = t_seed * 1e3
    results["cu_seqlens_ours_ms"] = t_ours * 1e3
    results["cu_seqlens_speedup"] = t_seed / t_ours
    print(
        f"cu_seqlens prep  : seed loop {t_seed * 1e3:.2f} ms, ours {t_ours * 1e3:.2f} ms ({t_seed / t_ours:.1f}x)"
    )

    # ---- attention-only useful TFLOP/s of the varlen path (causal: only the lower triangle counts)
    if device == "cuda":
        heads, dim = cfg["num_attention_heads"], cfg["hidden_size"] // cfg["num_attention_heads"]
        mask = packed["attention_mask"][:rows_per_step].to(device)
        data = get_unpad_data(mask)
        total = data.indices.numel()
        q, k, v = (
            torch.randn(total, heads, dim, device=device, dtype=dtype, requires_grad=True) for _ in range(3)
        )
        seqlens = (data.cu_seqlens[1:] - data.cu_seqlens[:-1]).double()
        fwd_flops = float((4 * heads * dim * seqlens * (seqlens + 1) / 2).sum())

        def run():
            return backends.varlen_kernel(
                q, k, v, data.cu_seqlens, data.max_seqlen, scale=dim**-0.5, window_left=-1, causal=True
            )

        for _ in range(3):
            run().sum().backward()
        begin, stop = timer(device)
        begin()
        for _ in range(10):
            run()
        t_fwd = stop() / 10
        out = run()
        grad = torch.randn_like(out)
        begin()
        for _ in range(10):
            out = run()
            out.backward(grad)
        t_fb = stop() / 10
        results["varlen_attention_fwd_tflops"] = fwd_flops / t_fwd / 1e12
        results["varlen_attention_fwd_bwd_tflops"] = 3.5 * fwd_flops / t_fb / 1e12
        print(
            f"varlen attention : fwd {fwd_flops / t_fwd / 1e12:.0f} TFLOP/s, fwd+bwd {3.5 * fwd_flops / t_fb / 1e12:.0f} "
            "TFLOP/s (useful causal FLOPs)"
        )

    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
