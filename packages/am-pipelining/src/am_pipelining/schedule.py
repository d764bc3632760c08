"""Run split stages with torch.distributed.pipelining schedules (GPipe, 1F1B, Interleaved1F1B)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._args import require_device, require_int, require_module
from .split import split_model_into_stages

SCHEDULES: tuple[str, ...] = ("gpipe", "1f1b", "interleaved1f1b")


def _schedule_class(name: str):
    if not isinstance(name, str):
        raise TypeError(f"schedule must be a str (one of {SCHEDULES}), got {type(name).__name__}")
    from torch.distributed.pipelining import schedules

    table = {
        "gpipe": schedules.ScheduleGPipe,
        "1f1b": schedules.Schedule1F1B,
        "interleaved1f1b": schedules.ScheduleInterleaved1F1B,
    }
    key = name.lower().replace("_", "").replace("-", "")
    if key not in table:
        raise ValueError(f"unknown pipeline schedule {name!r}; expected one of {SCHEDULES}")
    return key, table[key]


def stage_indices_for_rank(rank: int, world_size: int, stages_per_rank: int) -> list[int]:
    """Loop-style assignment used by the interleaved schedules: rank r owns r, r+W, r+2W, ..."""
    return [rank + k * world_size for k in range(stages_per_rank)]


@dataclass
class PipelineRun:
    """What one rank holds: its stage modules, the PipelineStage objects and the schedule."""

    modules: list[nn.Module]
    stages: list[Any]
    schedule: Any
    stage_indices: list[int]
    num_stages: int

    @property
    def has_first(self) -> bool:
        return 0 in self.stage_indices

    @property
    def has_last(self) -> bool:
        return self.num_stages - 1 in self.stage_indices


def build_pipeline(
    model: nn.Module,
    *,
    rank: int,
    world_size: int,
    n_microbatches: int,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    schedule: str = "1f1b",
    stages_per_rank: int | None = None,
    device: torch.device | str = "cpu",
    group: Any = None,
    layers_per_stage: list[int] | None = None,
) -> PipelineRun:
    """Split `model` for this rank, wrap its stages in PipelineStage objects and build the schedule.

    GPipe and 1F1B use one stage per rank; Interleaved1F1B defaults to two stages per rank.
    The process group must already be initialised.
    """
    from torch.distributed.pipelining import PipelineStage

    require_module(model, "build_pipeline")
    world_size = require_int(world_size, "build_pipeline", "world_size", minimum=1)
    rank = require_int(rank, "build_pipeline", "rank", minimum=0)
    if rank >= world_size:
        raise ValueError(f"build_pipeline: rank must be in [0, world_size={world_size}), got {rank}")
    require_int(n_microbatches, "build_pipeline", "n_microbatches", minimum=1)
    if not callable(loss_fn):
        raise TypeError(f"build_pipeline: loss_fn must be callable, got {type(loss_fn).__name__}")
    key, cls = _schedule_class(schedule)
    if stages_per_rank is None:
        stages_per_rank = 2 if key == "interleaved1f1b" else 1
    stages_per_rank = require_int(stages_per_rank, "build_pipeline", "stages_per_rank", minimum=1)
    if key != "interleaved1f1b" and stages_per_rank != 1:
        raise ValueError(
            f"schedule {schedule!r} runs one stage per rank, got stages_per_rank={stages_per_rank}"
        )
    num_stages = world_size * stages_per_rank
    indices = stage_indices_for_rank(rank, world_size, stages_per_rank)
    device = require_device(device, "build_pipeline")
    modules = []
    for s in indices:
        module = split_model_into_stages(model, num_stages, stage_index=s, layers_per_stage=layers_per_stage)
        modules.append(module.to(device))
    stages = [PipelineStage(m, s, num_stages, device, group=group) for m, s in zip(modules, indices)]
    if key == "interleaved1f1b":
        sched = cls(stages, n_microbatches=n_microbatches, loss_fn=loss_fn)
    else:
        sched = cls(stages[0], n_microbatches=n_microbatches, loss_fn=loss_fn)
    return PipelineRun(modules, stages, sched, indices, num_stages)


def pipeline_train_step(
    run: PipelineRun,
    input_ids: torch.Tensor | None,
    target: torch.Tensor | None,
    **kwargs: Any,
) -> torch.Tensor | None:
    """One forward+backward over all microbatches; returns the mean microbatch loss on the last stage.

    Every rank calls this with the same kwargs (e.g. `position_ids` for packed batches, chunked like
    the inputs); `input_ids` is used by the first stage, `target` by the last. Gradients accumulate
    into the stage modules scaled by 1/n_microbatches (the schedule's default), i.e. the gradient of
    the mean microbatch loss. Returns None on ranks without the last stage.
    """
    if not isinstance(run, PipelineRun):
        raise TypeError(
            f"pipeline_train_step: run must be the PipelineRun of build_pipeline, got {type(run).__name__}"
        )
    losses: list[torch.Tensor] = []
    args = (input_ids,) if run.has_first else ()
    tgt = target if run.has_last else None
    run.schedule.step(*args, target=tgt, losses=losses if run.has_last else None, **kwargs)
    if not run.has_last:
        return None
    return torch.stack([loss.detach() for loss in losses]).mean()
