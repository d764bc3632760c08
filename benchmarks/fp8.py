"""FP8 linears (am-precision `inject_te_linear` + `te_fp8_autocast`, current scaling) vs the bf16 stack.

    python -m benchmarks.fp8 [--smoke] [--quality] [--path ours_varlen_liger] [--out benchmarks/results/fp8.json]

Speed (always): for each model shape, two copies from the same seed run the same packed training steps
(4 rows x 4096 tokens of log-uniform documents, am-packing's indexed mask, the attention backend and Liger
of `--path`, one of benchmarks.packing's paths; default `ours_varlen_liger`: torch varlen attention + Liger):
the bf16 arm as is, the FP8 arm with every eligible nn.Linear swapped for TE's Linear and its forward run
under `te_fp8_autocast("current")` (lm_head and norms stay bf16). A step is forward + backward + AdamW.
Arms alternate in rounds after warm-up; reported: median step time, tokens/s, the FP8/bf16 tokens/s ratio
(goal >= 1.3 on the 1B shape), and per arm its resting memory (weights, optimizer state, TE caches) and the
step peak above it. Shapes: `1b` (hidden 2048, 16 layers, intermediate 5632, vocab 32000) and `wide`
(hidden 4096, 8 layers, intermediate 11008: GEMMs dominate).

`--quality`: both arms train 50 steps from the same init on a learnable task (a noisy Markov chain over 97
tokens: the next token is a fixed permutation of the previous one with probability 0.8, else uniform; best
possible loss 1.40 nats), AdamW lr 5e-4 with 5 warm-up steps, unpacked rows (plain causal attention);
goal: final loss (mean of the last 5 steps) of FP8 within 1% of bf16; `learned` says the loss moved at
least halfway from its start to the floor, else the comparison says little.
Then the FP8 model's `get_plain_state_dict` loads (strict) into a fresh plain HF model, whose logits must
equal the swapped model's (outside FP8 autocast) to bf16 tolerance.

`--smoke`: tiny shapes on CPU with `ReferenceTELinear` / `reference_fp8_autocast` (FP8 rounding emulated in
torch) and SDPA with HF-native packing; it tests this script, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from am_precision import (
    ReferenceTELinear,
    get_plain_state_dict,
    inject_te_linear,
    iter_microbatches,
    reference_fp8_autocast,
    te_fp8_autocast,
)
from benchmarks.packing import PATHS, SMOKE, Path_, Shape, build_model, feed, make_batches, te_kernel

SHAPES = {
    "1b": Shape(2048, 16, 16, 5632, 32000, 4096, 4, 128, 4096, steps=8),
    "wide": Shape(4096, 8, 32, 11008, 32000, 4096, 4, 128, 4096, steps=8),
}
GOALS = {"fp8_vs_bf16_tokens_per_s_1b": 1.3, "quality_rel_loss_diff": 0.01}
QUALITY_MOD = 97
QUALITY_P = 0.8  # probability that the next token follows the rule
_p = QUALITY_P + (1 - QUALITY_P) / QUALITY_MOD
_q = (1 - QUALITY_P) / QUALITY_MOD
QUALITY_FLOOR = -(_p * math.log(_p) + (QUALITY_MOD - 1) * _q * math.log(_q))  # entropy of the next token


class Backend:
    """What the FP8 arm runs: TE on a GPU, the torch reference on CPU (smoke)."""

    def __init__(self, device: torch.device, recipe: str) -> None:
        self.real = device.type == "cuda"
        self.recipe = recipe
        self.linear_cls = None if self.real else ReferenceTELinear

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.real:
            return te_fp8_autocast(self.recipe)
        return reference_fp8_autocast(recipe=self.recipe)


@contextlib.contextmanager
def stack(models: list[torch.nn.Module], path: Path_, te_cls: Any) -> Iterator[None]:
    """`path`'s bf16 stack on every model (Liger, TE attention, packing), process-wide parts entered once."""
    import am_packing

    with contextlib.ExitStack() as undo:
        for model in models:
            if path.liger:
                import am_kernels

                am_kernels.patch_liger_kernel(model)
            if path.attn == "te":
                import am_attention

                undo.enter_context(am_attention.inject_te_attention(model, dot_product_attention_cls=te_cls))
        if path.feed == "indexed":
            if path.attn == "torch_varlen":
                undo.enter_context(am_packing.register_varlen_attention())
                for model in models:
                    model.set_attn_implementation("torch_varlen")
            if path.attn in ("torch_varlen", "te"):
                undo.enter_context(am_packing.configure_packing(path.attn))
            else:
                for model in models:
                    undo.enter_context(am_packing.enable_packing(model, path.attn))
        yield
        if path.attn == "torch_varlen" and path.feed == "indexed":
            for model in models:  # the varlen registration ends with this context
                model.set_attn_implementation("sdpa")


def optimizer(model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    cuda = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=cuda, foreach=not cuda)


def train_step(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    microbatches: list[dict],
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] | None,
) -> float:
    """Forward + backward per microbatch (FP8 weights cached across them), then one optimizer step."""
    losses = []
    # One microbatch: leave the flag None (no FP8 weight cache to keep); several: cache on the first.
    batches = iter_microbatches(microbatches) if len(microbatches) > 1 else microbatches
    for batch in batches:
        with autocast() if autocast is not None else contextlib.nullcontext():
            loss = model(**batch).loss / len(microbatches)
        loss.backward()
        losses.append(float(loss.detach()) * len(microbatches))
    # clipped like any real run: without it a 1B model from scratch spikes early (seen at step 12, lr 5e-4)
    # and the two arms' trajectories part ways for reasons that have nothing to do with FP8
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return sum(losses) / len(losses)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated() if device.type == "cuda" else 0


def _time_steps(arm: dict, batches: list[dict], device: torch.device) -> tuple[list[float], int]:
    """Step times (ms) and the step peak above resting memory (bytes) for `batches`."""
    _sync(device)
    resting = _allocated(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for batch in batches:
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            arm["loss"] = train_step(arm["model"], arm["opt"], [batch], arm["autocast"])
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            arm["loss"] = train_step(arm["model"], arm["opt"], [batch], arm["autocast"])
            times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() - resting if device.type == "cuda" else 0
    return times, peak


def build_arms(
    shape: Shape, path: Path_, device: torch.device, dtype: torch.dtype, backend: Backend, lr: float
) -> tuple[dict, dict]:
    """bf16 and FP8 arms from the same seed (weights equal), each with its own AdamW."""
    attn = path.attn if path.attn not in ("te", "torch_varlen") else "sdpa"
    bf16 = build_model(shape, device, dtype, attn)
    fp8 = build_model(shape, device, dtype, attn)
    handle = inject_te_linear(fp8, recipe=backend.recipe, linear_cls=backend.linear_cls)
    arms = (
        {"name": "bf16", "model": bf16, "opt": optimizer(bf16, lr), "autocast": None},
        {"name": "fp8", "model": fp8, "opt": optimizer(fp8, lr), "autocast": backend.autocast},
    )
    arms[1]["swapped"] = len(handle.taken)
    arms[1]["not_swapped"] = {r.name: r.reason for r in handle.plan if not r.taken}
    return arms


def run_speed(name: str, shape: Shape, path: Path_, device, dtype, backend: Backend, rounds: int) -> dict:
    batches, _padded, docs = make_batches(shape, device)
    batches = [feed(b, path) for b in batches]
    te_cls, _ = te_kernel(device) if path.attn == "te" else (None, "")
    base = _allocated(device)
    bf16, fp8 = build_arms(shape, path, device, dtype, backend, lr=1e-5)
    out: dict[str, Any] = {"shape": shape.__dict__, "path": path.name, "path_describes": path.describe()}
    with stack([bf16["model"], fp8["model"]], path, te_cls):
        resting = {}
        for arm in (
            bf16,
            fp8,
        ):  # warm-up; resting memory = weights + what warm-up left (AdamW state, TE caches)
            before = _allocated(device)
            _time_steps(arm, batches[:3], device)
            weights = sum(p.numel() * p.element_size() for p in arm["model"].parameters())
            resting[arm["name"]] = weights + _allocated(device) - before
        times: dict[str, list[float]] = {"bf16": [], "fp8": []}
        peaks = {"bf16": 0, "fp8": 0}
        measured = batches[3:]
        per_round = max(1, len(measured) // rounds)
        for r in range(rounds):  # alternate so clock and thermal drift hit both arms alike
            chunk = measured[r * per_round : (r + 1) * per_round] or measured[:per_round]
            for arm in (bf16, fp8) if r % 2 == 0 else (fp8, bf16):
                t, peak = _time_steps(arm, chunk, device)
                times[arm["name"]] += t
                peaks[arm["name"]] = max(peaks[arm["name"]], peak)
    tokens = shape.rows * shape.row_length
    real_tokens = sum(map(len, docs)) / len(batches)
    for arm in (bf16, fp8):
        ms = statistics.median(times[arm["name"]])
        out[arm["name"]] = {
            "step_ms_median": ms,
            "step_ms_all": [round(t, 2) for t in times[arm["name"]]],
            "tokens_per_s": tokens / (ms / 1e3),
            "real_tokens_per_s": real_tokens / (ms / 1e3),
            "resting_gib": resting[arm["name"]] / 2**30,
            "step_peak_gib": peaks[arm["name"]] / 2**30,
            "peak_total_gib": (resting[arm["name"]] + peaks[arm["name"]]) / 2**30,
            "last_loss": arm["loss"],
        }
    out["swapped_linears"] = fp8["swapped"]
    out["not_swapped"] = fp8["not_swapped"]
    out["fp8_vs_bf16_tokens_per_s"] = out["fp8"]["tokens_per_s"] / out["bf16"]["tokens_per_s"]
    out["fp8_vs_bf16_peak_total"] = out["fp8"]["peak_total_gib"] / max(out["bf16"]["peak_total_gib"], 1e-9)
    del bf16, fp8
    gc.collect()  # patched forwards bound to the models form cycles
    if device.type == "cuda":
        torch.cuda.empty_cache()
    out["memory_left_allocated_gib"] = (_allocated(device) - base) / 2**30
    print(
        f"[{name}] bf16 {out['bf16']['tokens_per_s']:.0f} tok/s, fp8 {out['fp8']['tokens_per_s']:.0f} tok/s: "
        f"fp8/bf16 = {out['fp8_vs_bf16_tokens_per_s']:.3f}; peak total {out['bf16']['peak_total_gib']:.1f} -> "
        f"{out['fp8']['peak_total_gib']:.1f} GiB",
        flush=True,
    )
    return out


def quality_batches(shape: Shape, steps: int, device: torch.device) -> list[dict]:
    """Rows of a noisy Markov chain over 97 tokens: the next token is f(x) = (5(x - 1) + 3) mod 97 + 1 with
    probability 0.8, else uniform; the best possible loss is QUALITY_FLOOR nats (learnable, not random)."""
    g = torch.Generator().manual_seed(2)
    out = []
    for _ in range(steps):
        seq = torch.empty(shape.rows, shape.row_length, dtype=torch.long)
        seq[:, 0] = torch.randint(1, QUALITY_MOD + 1, (shape.rows,), generator=g)
        noise = torch.rand(shape.rows, shape.row_length, generator=g) >= QUALITY_P
        random = torch.randint(1, QUALITY_MOD + 1, (shape.rows, shape.row_length), generator=g)
        for t in range(1, shape.row_length):
            rule = (5 * (seq[:, t - 1] - 1) + 3) % QUALITY_MOD + 1
            seq[:, t] = torch.where(noise[:, t], random[:, t], rule)
        labels = seq.clone()
        labels[:, 0] = -100
        out.append({"input_ids": seq.to(device), "labels": labels.to(device)})
    return out


def run_quality(shape: Shape, path: Path_, device, dtype, backend: Backend, steps: int, lr: float) -> dict:
    # The synthetic rows are not packed documents: each row is one sequence (plain causal attention).
    plain_path = Path_(f"{path.name}_unpacked", "sdpa", "native", liger=path.liger)
    batches = quality_batches(shape, steps, device)
    bf16, fp8 = build_arms(shape, plain_path, device, dtype, backend, lr=lr)
    warm = max(1, steps // 10)
    scheds = [
        torch.optim.lr_scheduler.LambdaLR(a["opt"], lambda s: min(1.0, (s + 1) / warm)) for a in (bf16, fp8)
    ]
    curves: dict[str, list[float]] = {"bf16": [], "fp8": []}
    with stack([bf16["model"], fp8["model"]], plain_path, None):
        for batch in batches:
            for arm, sched in zip((bf16, fp8), scheds, strict=True):
                curves[arm["name"]].append(train_step(arm["model"], arm["opt"], [batch], arm["autocast"]))
                sched.step()
        final = {k: statistics.mean(v[-5:]) for k, v in curves.items()}
        probe = batches[0]["input_ids"][:1, :256]
        with torch.no_grad():
            fp8_logits = fp8["model"](input_ids=probe).logits.float()
            with backend.autocast():
                fp8_logits_in_fp8 = fp8["model"](input_ids=probe).logits.float()
    plain = build_model(shape, device, dtype, "sdpa")
    plain.load_state_dict(get_plain_state_dict(fp8["model"]))  # strict: every key, nothing extra
    with torch.no_grad():
        plain_logits = plain(input_ids=probe).logits.float()
    diff = (plain_logits - fp8_logits).abs().max().item()
    # bf16 keeps 8 bits: logits of a few units agree to ~2^-7 relative; allow a few roundings more.
    tol = 4 * 2**-7 * plain_logits.abs().max().item() if dtype == torch.bfloat16 else 1e-4
    rel = abs(final["fp8"] - final["bf16"]) / final["bf16"]
    out = {
        "task": f"Markov chain over {QUALITY_MOD} tokens, rule followed with p={QUALITY_P}",
        "loss_floor": QUALITY_FLOOR,
        "lr": lr,
        "steps": steps,
        "initial_loss": {k: v[0] for k, v in curves.items()},
        "final_loss_last5": final,
        "loss_curves": {k: [round(x, 4) for x in v] for k, v in curves.items()},
        "quality_rel_loss_diff": rel,
        "quality_goal_met": rel <= GOALS["quality_rel_loss_diff"],
        "learned": final["bf16"] < 0.5 * (curves["bf16"][0] + QUALITY_FLOOR),
        "state_dict_into_plain_model": {
            "loaded_strict": True,
            "max_abs_logit_diff_vs_swapped_outside_fp8": diff,
            "tolerance": tol,
            "equal_to_bf16_tolerance": diff <= tol,
            "max_abs_logit_diff_swapped_fp8_vs_outside": (fp8_logits_in_fp8 - fp8_logits).abs().max().item(),
        },
    }
    print(
        f"[quality] loss after {steps} steps: bf16 {final['bf16']:.4f}, fp8 {final['fp8']:.4f} "
        f"(rel diff {rel:.4f}, goal <= 0.01); state_dict -> plain model logits max diff {diff:.3g} (tol {tol:.3g})",
        flush=True,
    )
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny CPU run with the torch reference; numbers mean nothing"
    )
    parser.add_argument("--quality", action="store_true", help="also the 50-step training-quality comparison")
    parser.add_argument(
        "--path", default=None, help="bf16 stack, a benchmarks.packing path (default ours_varlen_liger)"
    )
    parser.add_argument("--shapes", default="1b,wide", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--recipe", default="current")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quality-steps", type=int, default=50)
    parser.add_argument("--quality-lr", type=float, default=3e-4)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "fp8.json")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("benchmarks.fp8 needs a CUDA GPU with transformer-engine (use --smoke on CPU)")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    paths = {p.name: p for p in PATHS}
    default_path = "native_sdpa" if args.smoke else "ours_varlen_liger"
    path = paths[args.path or default_path]
    backend = Backend(device, args.recipe)
    shapes = {"smoke": SMOKE} if args.smoke else {n: SHAPES[n] for n in args.shapes.split(",") if n}
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "smoke": args.smoke,
        "fp8_backend": "transformer_engine" if backend.real else "ReferenceTELinear (torch emulation)",
        "recipe": args.recipe,
        "goals": GOALS,
    }
    for name, shape in shapes.items():
        result[name] = run_speed(name, shape, path, device, dtype, backend, args.rounds)
    if "1b" in result:
        result["fp8_vs_bf16_tokens_per_s_1b"] = result["1b"]["fp8_vs_bf16_tokens_per_s"]
        result["speed_goal_met_1b"] = (
            result["fp8_vs_bf16_tokens_per_s_1b"] >= GOALS["fp8_vs_bf16_tokens_per_s_1b"]
        )
    if args.quality:
        shape = SMOKE if args.smoke else SHAPES["1b"]
        steps = min(args.quality_steps, 30) if args.smoke else args.quality_steps
        result["quality"] = run_quality(shape, path, device, dtype, backend, steps, args.quality_lr)
    if args.smoke:
        print("SMOKE RUN: tiny model on CPU with the torch FP8 emulation; the numbers mean nothing")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
