"""Pipeline efficiency of am-pipelining on 2 GPUs: T(1 GPU, whole model) / (2 x T(2 stages)).

~1B-parameter Llama-style model in bf16, 8 microbatches, GPipe and 1F1B. Goal: efficiency >= 0.75.

    python -m benchmarks.pipelining [--smoke] [--out FILE]            # spawns 2 ranks itself
    torchrun --nproc-per-node 2 -m benchmarks.pipelining [--out FILE]  # or under torchrun

--smoke runs a tiny model on CPU with gloo: it only checks that the script executes; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

N_MICROBATCHES = 8


def _config(smoke: bool):
    import transformers as tf

    if smoke:
        return tf.LlamaConfig(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        )
    # Llama-3.2-1B shape (untied head: ~1.5B parameters with the separate lm_head).
    return tf.LlamaConfig(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )


def _loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1).float(), target.flatten())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, warmup: int, iters: int, barrier: bool) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    if barrier:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    if barrier:
        dist.barrier()
    return (time.perf_counter() - start) / iters


def worker(rank: int, world: int, port: int, args) -> None:
    import transformers as tf

    from am_pipelining import build_pipeline, pipeline_train_step

    smoke = args.smoke
    use_cuda = torch.cuda.is_available() and not smoke
    device = torch.device(f"cuda:{rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        device_id=device if use_cuda else None,
    )
    dtype = torch.bfloat16 if use_cuda else torch.float32
    cfg = _config(smoke)
    cfg._attn_implementation = "sdpa"
    mb, seq = (2, 1024) if not smoke else (1, 32)
    batch = mb * N_MICROBATCHES
    warmup, iters = (3, 10) if not smoke else (1, 2)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)
    target = torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)

    torch.manual_seed(0)
    with torch.device("meta"):
        model = tf.LlamaForCausalLM(cfg)
    n_params = sum(p.numel() for p in model.parameters())
    results: dict = {
        "params": n_params,
        "microbatches": N_MICROBATCHES,
        "microbatch_size": mb,
        "seq_len": seq,
        "dtype": str(dtype),
        "device": torch.cuda.get_device_name(device) if use_cuda else "cpu",
        "smoke": smoke,
    }

    def materialise(module):
        module = module.to_empty(device=device).to(dtype)
        for p in module.parameters():
            torch.nn.init.normal_(p, std=0.02)
        from am_pipelining import init_hf_model_buffers

        init_hf_model_buffers(module, device)
        return module

    # Baseline: the whole model on one GPU, same 8 microbatches with gradient accumulation.
    if rank == 0:
        import copy

        whole = materialise(copy.deepcopy(model)).train()

        def baseline_step():
            for k in range(N_MICROBATCHES):
                sl = slice(k * mb, (k + 1) * mb)
                (
                    _loss(whole(input_ids=ids[sl], use_cache=False).logits, target[sl]) / N_MICROBATCHES
                ).backward()

        results["t_single_s"] = _time(baseline_step, device, warmup, iters, barrier=False)
        del whole
        if use_cuda:
            torch.cuda.empty_cache()
    dist.barrier()

    for schedule in ("gpipe", "1f1b"):
        run = build_pipeline(
            model,
            rank=rank,
            world_size=world,
            n_microbatches=N_MICROBATCHES,
            loss_fn=_loss,
            schedule=schedule,
            device="meta",
        )
        run.modules[:] = [materialise(m).train() for m in run.modules]
        from torch.distributed.pipelining import PipelineStage

        _key, cls = __import__("am_pipelining.schedule", fromlist=["_schedule_class"])._schedule_class(
            schedule
        )
        run.stages = [
            PipelineStage(m, s, run.num_stages, device) for m, s in zip(run.modules, run.stage_indices)
        ]
        run.schedule = cls(run.stages[0], n_microbatches=N_MICROBATCHES, loss_fn=_loss)
        t = _time(lambda run=run: pipeline_train_step(run, ids, target), device, warmup, iters, barrier=True)
        results[f"t_pipeline_{schedule}_s"] = t
        if rank == 0:
            results[f"layers_stage0_{schedule}"] = len(run.modules[0].model.layers)
        del run
        if use_cuda:
            torch.cuda.empty_cache()

    if rank == 0:
        for schedule in ("gpipe", "1f1b"):
            eff = results["t_single_s"] / (world * results[f"t_pipeline_{schedule}_s"])
            results[f"efficiency_{schedule}"] = eff
            print(
                f"[pipelining] {schedule}: single {results['t_single_s'] * 1e3:.1f} ms, 2-stage "
                f"{results[f't_pipeline_{schedule}_s'] * 1e3:.1f} ms, efficiency {eff:.3f} (goal >= 0.75)"
            )
        if smoke:
            print("[pipelining] --smoke: tiny CPU model, these numbers mean nothing")
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2))
        print(f"[pipelining] wrote {out}")
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/pipelining.json")
    args = parser.parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # under torchrun
        port = int(os.environ.get("MASTER_PORT", "29500")) + 1
        worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), port, args)
        return
    torch.multiprocessing.spawn(worker, args=(2, _free_port(), args), nprocs=2, join=True)


if __name__ == "__main__":
    main()
