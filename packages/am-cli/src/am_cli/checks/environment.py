"""Installed versions and optional kernels."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from ..report import INFO, PASS, Section

PACKAGES = ("am-attention", "am-packing", "am-precision", "am-pipelining", "am-kernels", "am-cli")
# (distribution, import name): the optional kernels, detected without importing them.
OPTIONAL = (
    ("flash-attn", "flash_attn"),
    ("transformer-engine", "transformer_engine"),
    ("liger-kernel", "liger_kernel"),
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_environment() -> Section:
    import transformers

    section = Section(
        "environment", "Installed versions and optional kernels", ["component", "version", "detail"]
    )
    section.add(
        INFO, component="python", version=platform.python_version(), detail=platform.platform(terse=True)
    )
    section.add(INFO, component="torch", version=torch.__version__, detail="")
    section.add(INFO, component="transformers", version=transformers.__version__, detail="")
    for name in PACKAGES:
        version = _version(name)
        section.add(PASS if version else INFO, component=name, version=version or "not installed", detail="")
    for distribution, module in OPTIONAL:
        present = importlib.util.find_spec(module) is not None
        version = _version(distribution) if present else None
        section.add(
            INFO,
            component=distribution,
            version=version or ("installed" if present else "not installed"),
            detail="optional kernel",
        )
    if torch.cuda.is_available():
        detail = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        section.add(INFO, component="CUDA", version=torch.version.cuda, detail=detail)
    else:
        section.add(
            INFO, component="CUDA", version="not available", detail="CPU only: GPU kernels are not run"
        )
    return section
