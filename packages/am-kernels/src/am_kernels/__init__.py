"""am-kernels: SDPA backend pinning and per-instance Liger-kernel patching for Hugging Face models.

Importing this package never imports liger-kernel, never touches CUDA and patches nothing.
"""

from .availability import HAS_LIGER_KERNEL
from .liger import LigerKernelPatch as LigerKernelPatch
from .liger import get_liger_kernel_patch, patch_liger_kernel, unpatch_liger_kernel
from .liger_forwards import LigerOps, load_liger_ops
from .liger_plans import LIGER_PLANS as LIGER_PLANS
from .liger_plans import LigerPlan as LigerPlan
from .liger_plans import supported_model_types
from .report import PatchedModule as PatchedModule
from .report import PatchReport as PatchReport
from .report import get_patch_report
from .sdpa import DEFAULT_SDPA_BACKENDS, get_sdpa_backends, patch_sdpa_backends, unpatch_sdpa_backends
from .signature import assert_same_signature
from .version import __version__

# What users call (and the constants they pass or test). The plan table and the types of returned values
# are re-exported above (`X as X`) for annotations and introspection, outside the star-import surface.
__all__ = [
    "DEFAULT_SDPA_BACKENDS",
    "HAS_LIGER_KERNEL",
    "LigerOps",
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
