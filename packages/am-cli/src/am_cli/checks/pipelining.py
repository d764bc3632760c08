"""am-pipelining: compatibility and the stage split."""

from __future__ import annotations

from typing import Any

from am_pipelining import get_pipeline_problems, get_stage_plan

from ..report import PASS, REFUSED, Section
from ._models import meta_model


def _summarise(names: list[str]) -> str:
    layers = [n for n in names if ".layers." in n]
    others = [n for n in names if ".layers." not in n]
    span = ""
    if layers:
        first, last = layers[0].rsplit(".", 1)[1], layers[-1].rsplit(".", 1)[1]
        span = f"layers {first}-{last}" if first != last else f"layer {first}"
    return ", ".join([span, *others] if span else others)


def check_pipeline(config: Any, stages: int) -> Section:
    section = Section(
        "pipelining", f"Pipeline-parallel compatibility and the {stages}-stage split", ["stage", "owns"]
    )
    model = meta_model(config)
    problems = get_pipeline_problems(model, num_stages=stages)
    if problems:  # am-pipelining refuses this model, with the reasons: the right answer, not a failure
        for problem in problems:
            section.add(REFUSED, stage="refused", owns=problem)
        return section
    for index, names in enumerate(get_stage_plan(model, stages)):
        section.add(PASS, stage=str(index), owns=_summarise(names))
    return section
