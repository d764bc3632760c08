"""One rank of a gloo pipeline run, forked by test_schedule.py (tcp:// rendezvous on a free port).

Builds the same tiny model on every rank, computes the unsplit model's loss and gradients on the
same microbatches locally, runs the pipeline, and writes the largest differences to JSON.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import tiny_models

from am_pipelining import build_pipeline, pipeline_train_step

N_MB = 4


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def packed_positions(batch: int, seq: int) -> torch.Tensor:
    # Two documents per row with different split points: positions restart at each document.
    rows = []
    for b in range(batch):
        cut = 3 + b % 5
        rows.append(torch.cat([torch.arange(cut), torch.arange(seq - cut)]))
    return torch.stack(rows)


def reference(model, ids, target, position_ids):
    model.zero_grad(set_to_none=True)
    losses = []
    for mb in range(N_MB):
        sl = slice(mb * ids.shape[0] // N_MB, (mb + 1) * ids.shape[0] // N_MB)
        kw = {} if position_ids is None else {"position_ids": position_ids[sl]}
        logits = model(input_ids=ids[sl], use_cache=False, **kw).logits
        loss = loss_fn(logits, target[sl]) / N_MB
        loss.backward()
        losses.append(loss.detach() * N_MB)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.stack(losses).mean(), grads


def run_rank(rank: int, world: int, port: int, out_dir: str, case_list: str) -> None:
    """Entry point of one rank (forked by the test, or run as a script with RANK/WORLD_SIZE set)."""
    torch.set_num_threads(1)
    cases = [c.split(":") for c in case_list.split(",")]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = {}
    for arch, schedule, packed in cases:
        model = tiny_models.build(arch, layers=4).train()
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(20, tiny_models.VOCAB, (8, 16), generator=g)
        target = torch.randint(0, tiny_models.VOCAB, (8, 16), generator=g)
        pos = packed_positions(8, 16) if packed == "packed" else None
        ref_loss, ref_grads = reference(model, ids, target, pos)
        run = build_pipeline(
            model, rank=rank, world_size=world, n_microbatches=N_MB, loss_fn=loss_fn, schedule=schedule
        )
        kw = {} if pos is None else {"position_ids": pos}
        # A plain step first: the packed step that follows must not reuse its cached mask.
        if pos is not None:
            pipeline_train_step(run, ids, target)
            for m in run.modules:
                m.zero_grad(set_to_none=True)
        loss = pipeline_train_step(run, ids, target, **kw)
        max_grad_diff, n_grads = 0.0, 0
        for module in run.modules:
            for name, p in module.named_parameters():
                assert p.grad is not None, f"{name} got no gradient"
                max_grad_diff = max(max_grad_diff, (p.grad - ref_grads[name]).abs().max().item())
                n_grads += 1
        key = f"{arch}:{schedule}:{packed}"
        results[key] = {
            "grad_diff": max_grad_diff,
            "n_grads": n_grads,
            "loss_diff": None if loss is None else abs(loss.item() - ref_loss.item()),
        }
        dist.barrier()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    run_rank(
        int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["MASTER_PORT"]), *sys.argv[1:3]
    )
