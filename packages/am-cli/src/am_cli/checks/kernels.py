"""am-kernels: whether Liger kernels cover this model and which modules they would replace."""

from __future__ import annotations

from typing import Any

import torch

from am_kernels import (
    HAS_LIGER_KERNEL,
    get_patch_report,
    patch_liger_kernel,
    supported_model_types,
    unpatch_liger_kernel,
)

from ..report import INFO, PASS, SKIP, Section
from ._models import real_model


def check_liger(config: Any) -> Section:
    section = Section("liger", "Liger kernels (patched per instance, then reverted)", ["kernel", "modules"])
    model_type = getattr(config, "model_type", "?")
    if not HAS_LIGER_KERNEL:
        section.add(SKIP, kernel="liger-kernel not installed", modules='pip install "am-kernels[liger]"')
        return section
    if model_type not in supported_model_types():
        section.add(INFO, kernel=f"model type {model_type!r} has no Liger plan", modules=None)
        return section
    model = real_model(config)
    patch_liger_kernel(model)
    try:
        report = get_patch_report(model)
        for marker, count in report.counts().items():
            section.add(PASS, kernel=marker, modules=count)
    finally:
        unpatch_liger_kernel(model)
    if not torch.cuda.is_available():
        section.notes.append(
            "Liger's Triton kernels execute on CUDA only; on CPU the patch is applied and reverted"
        )
    return section
