"""Real pipeline runs (gloo, CPU, 2 and 4 processes): loss and every gradient equal the unsplit model's."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from am_pipelining import SCHEDULES
from am_pipelining.schedule import _schedule_class, stage_indices_for_rank

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker
import tiny_models


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(world: int, cases: list[str], tmp_path: Path) -> dict:
    # Forked children reuse this process's imported torch/transformers: spawning fresh
    # interpreters costs ~8 s of imports each on the 2-core CI machine.
    ctx = mp.get_context("fork")
    import torch.distributed.pipelining  # noqa: F401  (imported once here, not in every child)

    for arch in {c.split(":")[0] for c in cases}:
        tiny_models.build(arch, layers=2)
    port = _free_port()
    procs = [
        ctx.Process(target=dist_worker.run_rank, args=(rank, world, port, str(tmp_path), ",".join(cases)))
        for rank in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    hung = [i for i, p in enumerate(procs) if p.is_alive()]
    for i in hung:
        procs[i].kill()
    assert not hung, f"ranks {hung} did not finish"
    failed = [i for i, p in enumerate(procs) if p.exitcode != 0]
    assert not failed, (
        f"ranks {failed} failed (exit codes {[procs[i].exitcode for i in failed]}); see stderr above"
    )
    merged: dict = {}
    for rank in range(world):
        for key, value in json.loads((tmp_path / f"rank{rank}.json").read_text()).items():
            merged.setdefault(key, []).append(value)
    return merged


def _check(results: dict, world: int) -> None:
    for key, per_rank in results.items():
        assert len(per_rank) == world
        # fp32, same microbatches; only the summation order of gradient accumulation differs.
        assert max(r["grad_diff"] for r in per_rank) < 1e-5, (key, per_rank)
        assert all(r["n_grads"] > 0 for r in per_rank), key
        losses = [r["loss_diff"] for r in per_rank if r["loss_diff"] is not None]
        assert len(losses) == 1 and losses[0] < 1e-5, (key, per_rank)


@pytest.mark.dist
def test_two_processes_gpipe_1f1b_interleaved_and_packed(tmp_path):
    cases = [
        "llama:gpipe:plain",
        "llama:1f1b:plain",
        "llama:interleaved1f1b:plain",
        "qwen2_sliding:1f1b:packed",
    ]
    results = _launch(2, cases, tmp_path)
    assert sorted(results) == sorted(cases)
    _check(results, 2)


@pytest.mark.dist
def test_four_processes_gpipe_and_1f1b(tmp_path):
    cases = ["llama:gpipe:plain", "gemma3:1f1b:plain"]
    results = _launch(4, cases, tmp_path)
    _check(results, 4)


def test_stage_indices_loop_assignment():
    assert stage_indices_for_rank(1, 4, 2) == [1, 5]
    assert stage_indices_for_rank(0, 2, 1) == [0]


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="gpipe"):
        _schedule_class("zero-bubble")
    assert [_schedule_class(s)[0] for s in ("GPipe", "1F1B", "Interleaved1F1B")] == list(SCHEDULES)
