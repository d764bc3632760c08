"""Shared timing for the benchmarks: CUDA events on a GPU, wall clock elsewhere (smoke runs)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def make_timer(device: torch.device) -> Callable[[Callable[[], object], int], float]:
    """A function `run(fn, iters)` returning milliseconds per call of `fn`."""
    if device.type == "cuda":

        def run(fn: Callable[[], object], iters: int) -> float:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end) / iters

    else:

        def run(fn: Callable[[], object], iters: int) -> float:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            return (time.perf_counter() - t0) * 1e3 / iters

    return run
