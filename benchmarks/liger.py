"""Liger kernels (am-kernels) vs plain transformers: peak memory and step time of one training step.

    python -m benchmarks.liger [--smoke] [--out benchmarks/results/liger.json]

A Llama-style model with a 128k vocabulary (hidden 2048, 4 layers, bf16, SDPA) takes 8k tokens per step
(forward with labels + backward). The unpatched model and a deep copy patched with `patch_liger_kernel`
are measured alternately in the same process (CUDA events, warmup, several iterations). Memory is the
step's peak above the resting memory (weights + grads from the previous step), and the total peak.
Goals: peak ratio <= 0.5, step-time ratio <= 1.05. `--smoke` builds a tiny model on CPU and exits:
Liger's Triton kernels cannot run there, so it only checks that the script and the patch work.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

import torch
import transformers

from am_kernels import HAS_LIGER_KERNEL, get_patch_report, patch_liger_kernel, unpatch_liger_kernel

FULL = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=4,
    num_attention_heads=16,
    num_key_value_heads=8,
    max_position_embeddings=8192,
)
SMOKE = dict(
    vocab_size=256,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
GOALS = {"peak_step_ratio": 0.5, "step_time_ratio": 1.05}


def build(sizes: dict, device: str, dtype: torch.dtype) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(**sizes)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype).train()


def step(model, ids) -> float:
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return float(loss.detach())


def measure(model, ids) -> dict:
    model.zero_grad(set_to_none=False)  # grads exist from warmup: resting memory = weights + grads
    torch.cuda.synchronize()
    resting = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    loss = step(model, ids)
    end.record()
    torch.cuda.synchronize()
    peak_step = torch.cuda.max_memory_allocated() - resting
    # Both models live on the GPU at once, so the total is this model's weights + grads + its step peak.
    own = sum(2 * p.numel() * p.element_size() for p in model.parameters())
    return {
        "ms": start.elapsed_time(end),
        "peak_step": peak_step,
        "peak_total": own + peak_step,
        "loss": loss,
    }


def run_full(args) -> dict:
    if not torch.cuda.is_available():
        sys.exit("benchmarks.liger needs a CUDA GPU (use --smoke for a CPU shape check)")
    if not HAS_LIGER_KERNEL:
        sys.exit('benchmarks.liger needs liger-kernel: pip install "am-kernels[liger]"')
    base = build(FULL, "cuda", torch.bfloat16)
    liger = patch_liger_kernel(copy.deepcopy(base))
    counts = get_patch_report(liger).counts()
    batch, seq = args.batch, args.tokens // args.batch
    ids = torch.randint(0, FULL["vocab_size"], (batch, seq), device="cuda")
    for _ in range(args.warmup):
        step(base, ids)
        step(liger, ids)
    rows = {"unpatched": [], "liger": []}
    for _ in range(args.iters):  # alternate so that clock/thermal drift hits both equally
        rows["unpatched"].append(measure(base, ids))
        rows["liger"].append(measure(liger, ids))
    summary = {}
    for name, samples in rows.items():
        summary[name] = {
            "step_ms_median": statistics.median(s["ms"] for s in samples),
            "peak_step_gib": max(s["peak_step"] for s in samples) / 2**30,
            "peak_total_gib": max(s["peak_total"] for s in samples) / 2**30,
            "loss": samples[-1]["loss"],
        }
    u, lg = summary["unpatched"], summary["liger"]
    ratios = {
        "peak_step_ratio": lg["peak_step_gib"] / u["peak_step_gib"],
        "peak_total_ratio": lg["peak_total_gib"] / u["peak_total_gib"],
        "step_time_ratio": lg["step_ms_median"] / u["step_ms_median"],
    }
    unpatch_liger_kernel(liger)
    return {
        "model": {**FULL, "dtype": "bfloat16", "batch": batch, "seq": seq, "tokens": batch * seq},
        "iters": args.iters,
        "warmup": args.warmup,
        "patched_modules": counts,
        **summary,
        "ratios": ratios,
        "goals": GOALS,
        "meets_goals": {k: ratios[k] <= v for k, v in GOALS.items()},
        "loss_abs_diff": abs(lg["loss"] - u["loss"]),
    }


def run_smoke() -> dict:
    model = build(SMOKE, "cpu", torch.float32)
    ids = torch.randint(0, SMOKE["vocab_size"], (1, 32))
    loss = step(model, ids)  # the unpatched baseline runs on CPU
    counts = {}
    if HAS_LIGER_KERNEL:
        patch_liger_kernel(model)
        counts = get_patch_report(model).counts()
        unpatch_liger_kernel(model)
    print("SMOKE RUN: tiny model on CPU; Liger's Triton kernels cannot run here, so no liger step was")
    print("timed and these numbers mean nothing. Run without --smoke on a CUDA GPU for the benchmark.")
    return {"smoke": True, "numbers_mean_nothing": True, "unpatched_loss": loss, "patched_modules": counts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny CPU shape check; numbers mean nothing")
    parser.add_argument(
        "--out", type=Path, default=Path(__file__).resolve().parent / "results" / "liger.json"
    )
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args(argv)
    result = run_smoke() if args.smoke else run_full(args)
    if not args.smoke:
        r = result["ratios"]
        print(
            f"peak memory per step: liger/unpatched = {r['peak_step_ratio']:.3f} (goal <= 0.5); "
            f"total peak {r['peak_total_ratio']:.3f}"
        )
        print(f"step time: liger/unpatched = {r['step_time_ratio']:.3f} (goal <= 1.05)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
