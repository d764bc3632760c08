"""am-packing: exact packed-sequence training for Hugging Face models on every attention backend.

Importing this package patches nothing, imports no optional extra and never touches CUDA.
"""

from .backends import VARLEN_ATTN_IMPLEMENTATION, register_varlen_attention, unregister_varlen_attention
from .collator import PackingCollator, pack_sequences
from .dataset import get_packing_efficiency, pack_dataset
from .discovery import PACKING_PATCH_MODULES, find_causal_mask_modules, get_packing_modules
from .marker import DocumentIdMask
from .mask import get_seqlens_in_batch, get_unpad_data, is_indexed_packed_mask, validate_indexed_mask
from .patches import (
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    configure_packing,
    create_causal_mask,
    get_attn_implementation,
    unconfigure_packing,
)
from .scoped import disable_packing, enable_packing, is_packing_enabled
from .support import PackingSupport, check_packing_support
from .version import __version__

__all__ = [
    "PACKING_PATCH_MODULES",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "VARLEN_ATTN_IMPLEMENTATION",
    "DocumentIdMask",
    "PackingCollator",
    "PackingSupport",
    "__version__",
    "check_packing_support",
    "configure_packing",
    "create_causal_mask",
    "disable_packing",
    "enable_packing",
    "find_causal_mask_modules",
    "get_attn_implementation",
    "get_packing_efficiency",
    "get_packing_modules",
    "get_seqlens_in_batch",
    "get_unpad_data",
    "is_indexed_packed_mask",
    "is_packing_enabled",
    "pack_dataset",
    "pack_sequences",
    "register_varlen_attention",
    "unconfigure_packing",
    "unregister_varlen_attention",
    "validate_indexed_mask",
]
