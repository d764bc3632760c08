"""am-precision: fp32-safe dtype casting, fp32 RMSNorm, TE FP8 recipes and module backends.

Importing this package imports neither transformer-engine nor any other optional kernel, touches no CUDA
state and patches nothing; TE is imported on first use of a TE-backed module or recipe. The helpers behind
these names (keyword rules, DTensor detection, dtype names) live in their modules (`am_precision.fp32_rules`,
...), importable but not part of the package's surface.
"""

from .availability import HAVE_DEEP_EP, HAVE_GMM, HAVE_TE, HAVE_UCCL_EP
from .casting import cast_frozen_modules_to_compute_dtype, cast_model_to_dtype, yield_fp32_model
from .config import BackendConfig, TEFp8Config
from .fp8 import FP8_RECIPES, build_fp8_recipe, te_fp8_autocast
from .fp32_rules import get_fp32_module_keywords, get_fp32_parameter_names
from .initializers import initialize_linear_module, initialize_rms_norm_module
from .lm_head import compute_lm_head_logits
from .microbatch import (
    get_is_first_microbatch,
    get_is_optim_step,
    iter_microbatches,
    set_is_first_microbatch,
    set_is_optim_step,
)
from .norms import Float32RMSNorm, compile_unavailable_reason, float32_rms_norm
from .rope import get_rope_config
from .te_lazy import is_tensor_unallocated, make_lazy_te_patcher, patch_te_modules, unpatch_te_modules
from .te_linear import get_plain_state_dict, inject_te_linear, plan_te_linear, remove_te_linear
from .te_mlp import inject_te_mlp, plan_te_mlp, remove_te_mlp
from .te_reference import ReferenceTELayerNormMLP, ReferenceTELinear, reference_fp8_autocast
from .version import __version__

__all__ = [
    "FP8_RECIPES",
    "HAVE_DEEP_EP",
    "HAVE_GMM",
    "HAVE_TE",
    "HAVE_UCCL_EP",
    "BackendConfig",
    "Float32RMSNorm",
    "ReferenceTELayerNormMLP",
    "ReferenceTELinear",
    "TEFp8Config",
    "__version__",
    "build_fp8_recipe",
    "cast_frozen_modules_to_compute_dtype",
    "cast_model_to_dtype",
    "compile_unavailable_reason",
    "compute_lm_head_logits",
    "float32_rms_norm",
    "get_fp32_module_keywords",
    "get_fp32_parameter_names",
    "get_is_first_microbatch",
    "get_is_optim_step",
    "get_plain_state_dict",
    "get_rope_config",
    "initialize_linear_module",
    "initialize_rms_norm_module",
    "inject_te_linear",
    "inject_te_mlp",
    "is_tensor_unallocated",
    "iter_microbatches",
    "make_lazy_te_patcher",
    "patch_te_modules",
    "plan_te_linear",
    "plan_te_mlp",
    "reference_fp8_autocast",
    "remove_te_linear",
    "remove_te_mlp",
    "set_is_first_microbatch",
    "set_is_optim_step",
    "te_fp8_autocast",
    "unpatch_te_modules",
    "yield_fp32_model",
]
