"""am-precision benchmark: compiled Float32RMSNorm vs eager fp32 RMSNorm, forward + backward, side by side.

    python -m benchmarks.precision [--smoke] [--out FILE]

Full run (GPU): hidden 4096 x 16384 tokens, bf16 input and weight. Goal: compiled >= 1.5x eager fp32.
Baselines measured in the same run: the same fp32 math run eagerly (`float32_rms_norm`, what
Float32RMSNorm falls back to) and torch's `F.rms_norm` on the fp32-upcast input. `--smoke` runs a tiny
shape that also works on CPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from am_precision import Float32RMSNorm, float32_rms_norm
from benchmarks._timing import make_timer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes; runs on CPU; numbers mean nothing")
    parser.add_argument("--out", default="benchmarks/results/precision.json")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=16384)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    hidden, tokens = (64, 128) if args.smoke else (args.hidden, args.tokens)
    warmup, iters = (2, 3) if args.smoke else (10, 50)
    eps = 1e-6
    torch.manual_seed(0)
    x = torch.randn(tokens, hidden, device=device, dtype=torch.bfloat16).requires_grad_(True)
    grad = torch.randn_like(x)
    norm = Float32RMSNorm(hidden, eps=eps, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.1)
    w = norm.weight

    def step(fwd):
        def run():
            x.grad = None
            w.grad = None
            fwd().backward(grad)

        return run

    variants = {
        "compiled_float32_rms_norm": step(lambda: norm(x)),
        "eager_fp32_rms_norm": step(lambda: float32_rms_norm(x, w, eps)),
        "eager_torch_rms_norm_fp32": step(
            lambda: torch.nn.functional.rms_norm(x.float(), (hidden,), w.float(), eps).to(x.dtype)
        ),
    }
    # Correctness before timing: the compiled output equals the eager fp32 math to bf16 precision.
    with torch.no_grad():
        torch.testing.assert_close(norm(x), float32_rms_norm(x, w, eps), rtol=2 * 2**-8, atol=1e-5)
    timer = make_timer(device)
    ms = {}
    for name, fn in variants.items():
        timer(fn, warmup)
        ms[name] = timer(fn, iters)
    base = ms["compiled_float32_rms_norm"]
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "smoke": args.smoke,
        "hidden": hidden,
        "tokens": tokens,
        "iters": iters,
        "ms_fwd_bwd": ms,
        "speedup_vs_eager_fp32": ms["eager_fp32_rms_norm"] / base,
        "speedup_vs_torch_rms_norm_fp32": ms["eager_torch_rms_norm_fp32"] / base,
        "goal_speedup_vs_eager_fp32": 1.5,
    }
    result["goal_met"] = result["speedup_vs_eager_fp32"] >= 1.5
    if args.smoke:
        print("SMOKE RUN: tiny shapes, numbers are meaningless")
    print(f"{'variant':32s} {'ms fwd+bwd':>12s}")
    for name, value in ms.items():
        print(f"{name:32s} {value:12.3f}")
    print(
        f"compiled vs eager fp32: {result['speedup_vs_eager_fp32']:.2f}x (goal >= 1.5x, "
        f"{'met' if result['goal_met'] else 'NOT met'}); vs torch rms_norm fp32: "
        f"{result['speedup_vs_torch_rms_norm_fp32']:.2f}x"
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
