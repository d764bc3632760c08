"""am-kernels: SDPA backend pinning and per-instance Liger-kernel patching for Hugging Face models.

Importing this package never imports liger-kernel, never touches CUDA and patches nothing.
"""

from .availability import HAS_LIGER_KERNEL
from .liger import LigerKernelPatch, get_liger_kernel_patch, patch_liger_kernel, unpatch_liger_kernel
from .liger_forwards import LigerOps, load_liger_ops
from .liger_plans import LIGER_PLANS, LigerPlan, supported_model_types
from .report import PatchedModule, PatchReport, get_patch_report
from .sdpa import DEFAULT_SDPA_BACKENDS, get_sdpa_backends, patch_sdpa_backends, unpatch_sdpa_backends
from .signature import assert_same_signature
from .version import __version__

__all__ = [
    "DEFAULT_SDPA_BACKENDS",
    "HAS_LIGER_KERNEL",
    "LIGER_PLANS",
    "LigerKernelPatch",
    "LigerOps",
    "LigerPlan",
    "PatchReport",
    "PatchedModule",
    "__version__",
    "assert_same_signature",
    "get_liger_kernel_patch",
    "get_patch_report",
    "get_sdpa_backends",
    "load_liger_ops",
    "patch_liger_kernel",
    "patch_sdpa_backends",
    "supported_model_types",
    "unpatch_liger_kernel",
    "unpatch_sdpa_backends",
]
