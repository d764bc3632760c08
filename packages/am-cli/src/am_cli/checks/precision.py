"""am-precision: which parameters stay fp32 after a bf16 cast."""

from __future__ import annotations

from typing import Any

import torch

from am_precision import cast_model_to_dtype, get_fp32_module_keywords

from ..report import FAIL, INFO, PASS, Section
from ._models import meta_model


def check_fp32_cast(config: Any) -> Section:
    section = Section(
        "precision",
        "Parameters kept in fp32 after cast_model_to_dtype(model, bfloat16)",
        ["parameter", "dtype", "rule"],
    )
    model = meta_model(config)  # meta tensors: the cast is checked at full size without memory
    keywords = get_fp32_module_keywords(model)
    cast_model_to_dtype(model, torch.bfloat16)
    kept = [(n, p.dtype) for n, p in model.named_parameters() if p.dtype == torch.float32]
    others = {p.dtype for n, p in model.named_parameters() if p.dtype != torch.float32}
    for name, dtype in kept:
        section.add(PASS, parameter=name, dtype=str(dtype).replace("torch.", ""), rule=", ".join(keywords))
    if not kept:
        section.add(
            INFO, parameter="(none)", dtype="—", rule=f"{type(model).__name__} declares no fp32 modules"
        )
    wrong = others - {torch.bfloat16}
    status = FAIL if wrong else PASS
    section.add(
        status,
        parameter="all others",
        dtype=", ".join(sorted(str(d).replace("torch.", "") for d in others)),
        rule="cast to bfloat16",
    )
    section.notes.append(f"_keep_in_fp32_modules keywords: {keywords or 'none'}")
    return section
