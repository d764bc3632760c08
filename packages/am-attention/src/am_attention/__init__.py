"""am-attention: attention-backend selection and Transformer Engine attention injection for HF models.

Importing this package patches nothing, imports no optional kernel and never touches CUDA.
"""

from .flash_flags import patch_legacy_flash_attn_flag, unpatch_legacy_flash_attn_flag
from .reference import ReferenceDotProductAttention
from .selection import (
    DEFAULT_ATTN_IMPLEMENTATION,
    PACKED_SEQUENCE_BACKENDS,
    apply_preload_overrides,
    next_fallback_attn,
    verify_sdpa_support,
)
from .stats import get_te_attention_stats, reset_te_attention_stats
from .te_backend import (
    TE_ATTN_IMPLEMENTATION,
    register_te_attention_backend,
    te_attention_forward,
    unregister_te_attention_backend,
)
from .te_inject import inject_te_attention, inject_te_attention_into_module, remove_te_attention
from .te_masks import detect_causal_mask
from .te_params import infer_attn_params, proj_out_features
from .te_plan import plan_te_attention
from .version import __version__

__all__ = [
    "DEFAULT_ATTN_IMPLEMENTATION",
    "PACKED_SEQUENCE_BACKENDS",
    "TE_ATTN_IMPLEMENTATION",
    "ReferenceDotProductAttention",
    "__version__",
    "apply_preload_overrides",
    "detect_causal_mask",
    "get_te_attention_stats",
    "infer_attn_params",
    "inject_te_attention",
    "inject_te_attention_into_module",
    "next_fallback_attn",
    "patch_legacy_flash_attn_flag",
    "plan_te_attention",
    "proj_out_features",
    "register_te_attention_backend",
    "remove_te_attention",
    "reset_te_attention_stats",
    "te_attention_forward",
    "unpatch_legacy_flash_attn_flag",
    "unregister_te_attention_backend",
    "verify_sdpa_support",
]
