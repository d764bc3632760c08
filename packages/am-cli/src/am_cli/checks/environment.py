"""Installed versions and optional kernels."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform

import torch

from ..report import FAIL, INFO, PASS, Section

PACKAGES = ("am-attention", "am-packing", "am-precision", "am-pipelining", "am-kernels", "am-cli")
# (distribution, module imported to prove it works): the optional kernels. Those installed are imported
# here, first, before any check runs CUDA work: an install that cannot load (a CUDA or cuDNN it was not built
# against) fails this row with the loader's reason instead of breaking a later check. liger-kernel comes
# before transformer-engine: on images where TE's core library resolves another cuDNN than torch's, TE
# first makes liger-kernel's import (which loads TE through peft) fail.
OPTIONAL = (
    ("flash-attn", "flash_attn"),
    ("liger-kernel", "liger_kernel.transformers"),
    ("transformer-engine", "transformer_engine.pytorch"),
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _import_error(module: str) -> str | None:
    try:
        importlib.import_module(module)
    except (ImportError, OSError) as exc:  # OSError: a shared library the loader could not resolve
        return f"{type(exc).__name__}: {str(exc)[:200]}"
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
        present = importlib.util.find_spec(module.split(".")[0]) is not None
        version = _version(distribution) if present else None
        broken = _import_error(module) if present else None
        section.add(
            FAIL if broken else INFO,
            component=distribution,
            version=version or ("installed" if present else "not installed"),
            detail=f"installed but does not import: {broken}" if broken else "optional kernel",
        )
    if torch.cuda.is_available():
        detail = f"{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})"
        section.add(INFO, component="CUDA", version=torch.version.cuda, detail=detail)
    else:
        section.add(
            INFO, component="CUDA", version="not available", detail="CPU only: GPU kernels are not run"
        )
    return section
