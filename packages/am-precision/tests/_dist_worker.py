"""Worker for the 2-process gloo FSDP2 test (run as a script by test_casting_dist.py)."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.register_buffer("scale", torch.full((d,), 1.0 / 3.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x)) * self.scale.to(x.dtype)


class ScaledNorm(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.inner = nn.LayerNorm(d)
        self.register_buffer("scale", torch.full((d,), 0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * self.scale.to(x.dtype)


class Tiny(nn.Module):
    # "norm" (non-strict, float16 casts only): under FSDP2 only its buffers stay fp32; "router" (strict):
    # its own fp32 unit.
    _keep_in_fp32_modules = ["norm"]  # noqa: RUF012
    _keep_in_fp32_modules_strict = ["router"]  # noqa: RUF012

    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.layers = nn.ModuleList([Block(d) for _ in range(2)])
        self.router = nn.Linear(d, 4)
        self.norm = ScaledNorm(d)
        self.register_buffer("norm_scale", torch.full((d,), 0.1))  # "norm_scale" is not the segment "norm"
        self.head = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        gate = self.router(x.float()).softmax(-1).sum(-1, keepdim=True).to(x.dtype)
        return self.head(self.norm(x)) * gate


def main() -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from am_precision import cast_model_to_dtype

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    torch.manual_seed(0)
    model = Tiny()
    router_before = {k: v.clone() for k, v in model.router.state_dict().items()}
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model.router, mesh=mesh)
    fully_shard(model, mesh=mesh)
    placements = {n: tuple(p.placements) for n, p in model.named_parameters()}

    cast_model_to_dtype(model, torch.bfloat16)

    out: dict = {"rank": rank, "dtypes": {}, "buffers": {}, "placements_kept": True, "dtensor": True}
    for n, p in model.named_parameters():
        out["dtypes"][n] = str(p.dtype).removeprefix("torch.")
        out["dtensor"] &= isinstance(p, DTensor)
        out["placements_kept"] &= tuple(p.placements) == placements[n]
    for n, b in model.named_buffers():
        out["buffers"][n] = str(b.dtype).removeprefix("torch.")
    full = {k: v.full_tensor() for k, v in model.router.state_dict().items()}
    out["router_exact"] = all(torch.equal(full[k], router_before[k]) for k in router_before)
    # The cast model must still run forward and backward under FSDP2.
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    loss = model(x).float().sum()
    loss.backward()
    out["finite"] = bool(torch.isfinite(loss).item())
    out["router_grad_dtype"] = str(model.router.weight.grad.dtype).removeprefix("torch.")

    # A strict keyword whose parameter shares its unit with bf16 parameters must be refused.
    mixed = Tiny()
    mixed._keep_in_fp32_modules_strict = ["proj"]
    fully_shard(mixed, mesh=mesh)
    try:
        cast_model_to_dtype(mixed, torch.bfloat16)
        out["mixed_error"] = None
    except ValueError as exc:
        out["mixed_error"] = str(exc)
    out["mixed_untouched"] = all(p.dtype == torch.float32 for p in mixed.parameters())

    # float16: the non-strict keyword applies too, and keeps only buffers on a sharded model.
    half = Tiny()
    for layer in half.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(half.router, mesh=mesh)
    fully_shard(half, mesh=mesh)
    cast_model_to_dtype(half, torch.float16)
    out["fp16_dtypes"] = {n: str(p.dtype).removeprefix("torch.") for n, p in half.named_parameters()}
    out["fp16_buffers"] = {n: str(b.dtype).removeprefix("torch.") for n, b in half.named_buffers()}

    with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as fh:
        json.dump(out, fh)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
