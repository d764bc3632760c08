"""Which optional kernels are installed, checked with `importlib.util.find_spec` (nothing is imported).

These flags are computed once at import. They say whether a package can be found, not whether it
works on this machine (a CUDA build of transformer-engine is "found" on a CPU-only host too).
"""

from __future__ import annotations

import importlib.util


def _installed(name: str) -> bool:
    # find_spec raises ModuleNotFoundError for a dotted name whose parent is missing and ValueError
    # when a module object without __spec__ sits in sys.modules; both mean "not usable as installed".
    try:
        return importlib.util.find_spec(name) is not None
    except (ModuleNotFoundError, ValueError):
        return False


HAVE_TE: bool = _installed("transformer_engine")
"""transformer-engine (`pip install "am-precision[te]"`)."""

HAVE_GMM: bool = _installed("grouped_gemm")
"""grouped_gemm (MoE grouped GEMM kernels)."""

HAVE_DEEP_EP: bool = _installed("deep_ep")
"""DeepEP (MoE token dispatcher)."""

HAVE_UCCL_EP: bool = _installed("uccl") or _installed("ep")
"""UCCL-EP (MoE token dispatcher; installs as `uccl` or as the bare `ep` module)."""

TE_INSTALL_HINT = 'pip install "am-precision[te]"'

__all__ = ["HAVE_DEEP_EP", "HAVE_GMM", "HAVE_TE", "HAVE_UCCL_EP"]
