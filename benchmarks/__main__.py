"""Run every GPU benchmark and write benchmarks/RESULTS.md.

    python -m benchmarks [--only packing,attention] [--smoke]

Each benchmark runs in its own process (a crash or OOM in one does not lose the others) and writes a
JSON file of numbers; this driver collects them into RESULTS.md with the GPU model, the torch and
transformers versions and the date. pipelining needs 2 GPUs and is launched with torchrun.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SINGLE_GPU = ("packing", "fp8", "attention", "precision", "liger")
MULTI_GPU = ("pipelining",)


def _environment() -> dict[str, str]:
    import torch
    import transformers

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    env = {
        "gpu": gpu,
        "gpus": str(torch.cuda.device_count()),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
        "transformers": transformers.__version__,
        "date": datetime.date.today().isoformat(),
    }
    try:
        import transformer_engine

        env["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        env["transformer_engine"] = "not installed"
    return env


def _run(name: str, out: Path, smoke: bool, timeout: int) -> dict:
    if name in MULTI_GPU:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            "-m",
            f"benchmarks.{name}",
            "--out",
            str(out),
        ]
    else:
        cmd = [sys.executable, "-m", f"benchmarks.{name}", "--out", str(out)]
    if smoke:
        cmd.append("--smoke")
    print(f"== {name}: {' '.join(cmd)}", flush=True)
    try:
        proc = subprocess.run(cmd, cwd=HERE.parent, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}"}
    return json.loads(out.read_text())


# (benchmark, path into its JSON, what it measures, goal, True when higher is better)
GOALS = (
    (
        "packing",
        ("shapes", "1b_4k", "ratios", "best / native_flex_liger"),
        "1B @ 4k rows: best am stack / HF-native flex + Liger, tokens/s",
        1.15,
        True,
    ),
    (
        "packing_long",
        ("shapes", "long_16k", "ratios", "best / native_flex"),
        "long context @ 16k rows: best am stack / HF-native flex, tokens/s",
        1.30,
        True,
    ),
    (
        "packing_1b_fused",
        ("shapes", "1b_4k", "ratios", "best / native_flex_liger"),
        "1B @ 4k rows, repeat run with the fused q/k/v + gate/up paths: best / HF-native flex + Liger",
        1.15,
        True,
    ),
    (
        "packing_1b_fused_run2",
        ("shapes", "1b_4k", "ratios", "best / native_flex_liger"),
        "1B @ 4k rows, repeat run, baseline first: best / HF-native flex + Liger",
        1.15,
        True,
    ),
    (
        "packing_long_fused",
        ("shapes", "long_16k", "ratios", "best / native_flex"),
        "long context @ 16k rows, repeat run with the fused paths: best / HF-native flex",
        1.30,
        True,
    ),
    (
        "packing_1b_mlp",
        ("shapes", "1b_4k", "ratios", "best / native_flex_liger"),
        "1B @ 4k rows, with norm + MLP as one TE LayerNormMLP (inject_te_mlp): best / HF-native flex + Liger",
        1.15,
        True,
    ),
    (
        "packing_1b_mlp_run2",
        ("shapes", "1b_4k", "ratios", "best / native_flex_liger"),
        "1B @ 4k rows, inject_te_mlp, repeat run (ours first): best / HF-native flex + Liger",
        1.15,
        True,
    ),
    (
        "packing_long_mlp",
        ("shapes", "long_16k", "ratios", "best / native_flex"),
        "long context @ 16k rows, inject_te_mlp: best / HF-native flex",
        1.30,
        True,
    ),
    ("fp8", ("fp8_vs_bf16_tokens_per_s_1b",), "FP8 (current scaling) / bf16 stack tokens/s, 1B", 1.3, True),
    (
        "packing",
        ("shapes", "1b_4k", "fp8_vs_best_bf16", "ratio"),
        "1B @ 4k rows: best FP8 stack / best bf16 path (HF-native flex + Liger), tokens/s",
        1.3,
        True,
    ),
    (
        "packing_1b_mlp_run2",
        ("shapes", "1b_4k", "fp8_vs_best_bf16", "ratio"),
        "1B @ 4k rows, inject_te_mlp: best FP8 stack (delayed scaling) / best bf16 path, tokens/s",
        1.3,
        True,
    ),
    ("fp8", ("quality", "quality_rel_loss_diff"), "FP8 vs bf16 loss after 50 steps, relative", 0.01, False),
    ("attention", ("causal", "ratio"), "TE injection / direct kernel call, causal bshd", 1.03, False),
    ("attention", ("mask4d", "ratio"), "TE injection / direct kernel call, canonical 4D mask", 1.03, False),
    ("attention", ("thd", "ratio"), "TE injection / direct kernel call, packed THD", 1.03, False),
    ("precision", ("speedup_vs_eager_fp32",), "compiled fp32 RMSNorm fwd+bwd speedup vs eager", 1.5, True),
    ("liger", ("ratios", "peak_step_ratio"), "Liger peak step memory / unpatched", 0.5, False),
    ("liger", ("ratios", "step_time_ratio"), "Liger step time / unpatched", 1.05, False),
    ("pipelining", ("efficiency_gpipe",), "pipeline efficiency T1 / (2 x T2), GPipe, 2 GPUs", 0.75, True),
    ("pipelining", ("efficiency_1f1b",), "pipeline efficiency T1 / (2 x T2), 1F1B, 2 GPUs", 0.75, True),
)


def _dig(numbers: dict, path: tuple[str, ...]) -> object:
    for key in path:
        if not isinstance(numbers, dict) or key not in numbers:
            return None
        numbers = numbers[key]
    return numbers


def _summary(results_dir: Path) -> list[str]:
    lines = ["| benchmark | measure | result | goal | met |", "|---|---|---|---|---|"]
    for name, path, what, goal, higher in GOALS:
        file = results_dir / f"{name}.json"
        value = _dig(json.loads(file.read_text()), path) if file.exists() else None
        if not isinstance(value, (int, float)):
            lines.append(f"| {name} | {what} | not measured | {'≥' if higher else '≤'} {goal} | — |")
            continue
        met = value >= goal if higher else value <= goal
        shown = f"{value:.3f}" if abs(value) >= 0.1 else f"{value:.3g}"  # 1.147 must not read as 1.15
        lines.append(
            f"| {name} | {what} | {shown} | {'≥' if higher else '≤'} {goal} | {'yes' if met else 'NO'} |"
        )
    return lines


def _markdown(results_dir: Path, markdown: Path) -> str:
    """RESULTS.md from every results/<name>.json, each with the machine it ran on."""
    lines = [
        "# Benchmark results",
        "",
        "Written by `python -m benchmarks` from `benchmarks/results/*.json`. Each benchmark measures ours and",
        "its baseline side by side in the same process; ratios are what to read, absolute times only describe",
        "the machine named under each benchmark.",
        "",
        *_summary(results_dir),
        "",
    ]
    for path in sorted(results_dir.glob("*.json")):
        numbers = json.loads(path.read_text())
        env = numbers.pop("environment", {})
        lines += [f"## {path.stem}", ""]
        if env:
            lines.append("Ran on " + ", ".join(f"{k} {v}" for k, v in env.items()) + ".")
            lines.append("")
        lines += ["```json", json.dumps(numbers, indent=2, default=str), "```", ""]
    return "\n".join(lines) + _kept_sections(markdown)


# Sections other benchmarks write into RESULTS.md themselves (CPU ones, `--write`): carried over as they are.
KEPT_SECTIONS = ("## Mask build (CPU)",)


def _kept_sections(markdown: Path) -> str:
    old = markdown.read_text() if markdown.exists() else ""
    kept = []
    for heading in KEPT_SECTIONS:
        start = old.find(heading)
        if start >= 0:
            end = old.find("\n## ", start + len(heading))
            kept.append(old[start : end if end >= 0 else len(old)].rstrip() + "\n")
    return "".join("\n" + section for section in kept)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; numbers mean nothing")
    parser.add_argument("--results-dir", default=str(HERE / "results"))
    parser.add_argument("--markdown", default=str(HERE / "RESULTS.md"))
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument(
        "--collect", action="store_true", help="run nothing: rewrite RESULTS.md from the JSON files there"
    )
    args = parser.parse_args()
    if args.collect:
        Path(args.markdown).write_text(_markdown(Path(args.results_dir), Path(args.markdown)))
        return 0

    import torch

    env = _environment()
    names = [n for n in args.only.split(",") if n] or [*SINGLE_GPU, *MULTI_GPU]
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict] = {}
    for name in names:
        if name in MULTI_GPU and torch.cuda.device_count() < 2 and not args.smoke:
            results[name] = {"skipped": f"needs 2 GPUs, found {torch.cuda.device_count()}"}
            continue
        out = results_dir / f"{name}.json"
        results[name] = _run(name, out, args.smoke, args.timeout)
        results[name]["environment"] = {**env, "smoke": args.smoke}
        out.write_text(json.dumps(results[name], indent=2, default=str))
    Path(args.markdown).write_text(_markdown(results_dir, Path(args.markdown)))
    print(json.dumps(results, indent=2, default=str))
    return 1 if any("error" in r for r in results.values()) else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
