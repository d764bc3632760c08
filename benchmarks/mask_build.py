"""CPU cost of building the attention mask for a packed [4, 4096] batch: ours vs transformers' own packing.

    python -m benchmarks.mask_build [--rows 4] [--seq 4096] [--iters 15] [--warmup 3] [--threads 1] \
        [--profile] [--write benchmarks/RESULTS.md] [--out FILE.json]

A tiny 1-layer Llama (config in code) runs the same packed documents on sdpa and eager through:

- ``native``: transformers' own packing, no patch: no mask, ``position_ids`` restarting per document
  (transformers detects the packed sequences from them), ``use_cache=False``;
- ``enable_packing``: am-packing's indexed mask (`PackingCollator`'s `DocumentIdMask`) on a model
  prepared with `enable_packing`;
- ``configure_packing``: the same indexed mask under the process-wide `configure_packing`.

Only the mask is timed: the modeling module's ``create_causal_mask`` (whatever is bound there, our
pass-through included) is wrapped for the run, and the forward is stopped right after it, so attention
never runs. Two spans: ``builder`` (that call alone) and ``path`` (from the start of the forward to the
mask built: the embedding lookup, plus for ``enable_packing`` its pre-hook validating the ids; the goal
is judged on it). Warm-up forwards are dropped; the median of the rest is
reported. ``--profile`` prints cProfile's top functions of one mask build per path of ours. One torch
thread by default: on a shared CPU the intra-op pool stalls for tens of milliseconds at random (measured:
the same build 0.6 ms or 75 ms with 2 threads), which would swamp the comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import re
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

GOAL = 2.0  # issue 16: ours <= 2x transformers' own position_ids path
SECTION = "## Mask build (CPU)"


class _Stop(Exception):
    """Raised right after the mask is built: the rest of the forward is not measured."""


def _model(impl: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=128,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8192,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation=impl, dtype=torch.float32).eval()


def _rows(rows: int, seq: int) -> list[dict[str, list[int]]]:
    """`rows` packed rows of `seq` tokens: documents of 64..seq/4 tokens (seeded) through `pack_dataset`."""
    from am_packing import pack_dataset

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(64, max(65, seq // 4) + 1, (4 * rows * seq // max(65, seq // 8),), generator=g)
    docs = [torch.randint(1, 128, (int(n),), generator=g).tolist() for n in lengths]
    return pack_dataset(docs, seq)[:rows]


@contextlib.contextmanager
def _timed_builder(
    model: torch.nn.Module, times: dict[str, list[float]], profile: cProfile.Profile | None
) -> Iterator[None]:
    """Time modeling_llama.create_causal_mask (the live binding) and stop the forward right after it.

    ``builder``: the call alone; ``path``: from the start of the forward (a pre-hook placed before every
    other, so it includes enable_packing's own pre-hook validating the ids) to the mask built."""
    import transformers.models.llama.modeling_llama as modeling

    live = vars(modeling)["create_causal_mask"]
    start: list[float] = []

    def timed(*args: Any, **kwargs: Any) -> Any:
        if profile is not None:
            profile.enable()
        t0 = time.perf_counter()
        times["mask"] = [live(*args, **kwargs)]
        t1 = time.perf_counter()
        if profile is not None:
            profile.disable()
        times["builder"].append((t1 - t0) * 1e3)
        times["path"].append((t1 - start[-1]) * 1e3)
        raise _Stop

    hook = model.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()), prepend=True)
    modeling.create_causal_mask = timed
    try:
        yield
    finally:
        modeling.create_causal_mask = live
        hook.remove()


def _measure(model: torch.nn.Module, batch: dict, iters: int, warmup: int, profile: bool) -> dict[str, Any]:
    """Median builder / path milliseconds over `iters` forwards after `warmup`; a cProfile top if asked."""
    for n in (warmup, iters):  # the last round is the one reported
        times: dict[str, list[float]] = {"builder": [], "path": []}
        for _ in range(n):
            with _timed_builder(model, times, None), contextlib.suppress(_Stop):
                model(**batch)
    result: dict[str, Any] = {f"{k}_ms": statistics.median(times[k]) for k in ("builder", "path")}
    result["mask"] = times["mask"][0]
    if profile:
        prof = cProfile.Profile()
        with _timed_builder(model, {"builder": [], "path": []}, prof), contextlib.suppress(_Stop):
            model(**batch)
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(12)
        result["profile"] = out.getvalue()
    return result


def run(rows: int, seq: int, iters: int, warmup: int, profile: bool) -> dict[str, Any]:
    import transformers

    from am_packing import PackingCollator, configure_packing, enable_packing

    packed = _rows(rows, seq)
    batch = PackingCollator(seq)(packed)
    native = {
        "input_ids": batch["input_ids"],
        "position_ids": batch["position_ids"],
        "use_cache": False,
    }
    indexed = {
        "input_ids": batch["input_ids"],
        "attention_mask": batch["attention_mask"],
        "position_ids": batch["position_ids"],
    }
    plain = {**indexed, "attention_mask": batch["attention_mask"].document_ids}
    result: dict[str, Any] = {
        "shape": [rows, seq],
        "documents": sum(len(r["seq_lengths"]) for r in packed),
        "real_tokens": sum(len(r["input_ids"]) for r in packed),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "iters": iters,
        "warmup": warmup,
        "paths": {},
        "profiles": {},
    }
    with torch.no_grad():
        for impl in ("sdpa", "eager"):
            model = _model(impl)
            paths = result["paths"]
            paths[f"native_{impl}"] = _measure(model, native, iters, warmup, False)
            mask = paths[f"native_{impl}"]["mask"]
            with enable_packing(model):
                paths[f"enable_packing_{impl}"] = _measure(model, indexed, iters, warmup, profile)
            with configure_packing(impl):
                paths[f"configure_packing_{impl}"] = _measure(model, plain, iters, warmup, profile)
            for name in (f"native_{impl}", f"enable_packing_{impl}", f"configure_packing_{impl}"):
                entry = paths[name]
                # the same mask, or the comparison means nothing
                if not torch.equal(entry.pop("mask"), paths[f"native_{impl}"].get("mask", mask)):
                    raise RuntimeError(f"{name} built another mask than transformers' own packing")
                if "profile" in entry:
                    result["profiles"][name] = entry.pop("profile")
                for k in ("builder_ms", "path_ms"):
                    entry[k.replace("_ms", "_ratio")] = entry[k] / paths[f"native_{impl}"][k]
    return result


def _markdown(result: dict[str, Any], command: str) -> str:
    rows, seq = result["shape"]
    lines = [
        SECTION,
        "",
        f"Written by `{command}` (CPU, torch threads: {result['threads']}, torch {result['torch']}, transformers "
        f"{result['transformers']}; median of {result['iters']} builds after {result['warmup']} warm-up, "
        f"tiny 1-layer Llama, [{rows}, {seq}] batch of {result['documents']} documents from `pack_dataset`). Only the attention mask "
        "is timed (the modeling module's `create_causal_mask` call); `native` is transformers' own packing "
        "(position_ids, no mask, no patch). Goal (issue 16): ours ≤ "
        f"{GOAL:g}× native.",
        "",
        "| backend | path | builder ms | × native | forward start → mask ms | × native | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for impl in ("sdpa", "eager"):
        for name in ("native", "enable_packing", "configure_packing"):
            e = result["paths"][f"{name}_{impl}"]
            met = "—" if name == "native" else ("yes" if e["path_ratio"] <= GOAL else "NO")
            lines.append(
                f"| {impl} | {name} | {e['builder_ms']:.2f} | {e['builder_ratio']:.2f} | {e['path_ms']:.2f} | "
                f"{e['path_ratio']:.2f} | {met} |"
            )
    return "\n".join(lines) + "\n"


def _write_section(path: Path, section: str) -> None:
    """Replace this benchmark's section of RESULTS.md (or append it), leaving the rest untouched."""
    text = path.read_text() if path.exists() else ""
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4)
    parser.add_argument("--seq", type=int, default=4096)
    parser.add_argument("--iters", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--profile", action="store_true", help="print cProfile's top functions of ours")
    parser.add_argument("--write", default="", help="RESULTS.md to update the 'Mask build (CPU)' section of")
    parser.add_argument("--out", default="", help="also write the numbers as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result = run(args.rows, args.seq, args.iters, args.warmup, args.profile)
    profiles = result.pop("profiles")
    if args.profile:
        for name, top in profiles.items():
            print(f"== cProfile, one mask build, {name}\n{top}")
    print(json.dumps(result, indent=2))
    command = (
        f"python -m benchmarks.mask_build --rows {args.rows} --seq {args.seq} --iters {args.iters} "
        f"--warmup {args.warmup} --threads {args.threads}"
    )
    print(_markdown(result, command))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.write:
        _write_section(Path(args.write), _markdown(result, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
