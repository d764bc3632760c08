"""am-packing: exact packed-sequence training for Hugging Face models on every attention backend.

Importing this package patches nothing, imports no optional extra and never touches CUDA.
"""

from .backends import (
    VARLEN_ATTN_IMPLEMENTATION,
    document_mask_function,
    register_varlen_attention,
    unregister_varlen_attention,
    varlen_attention_forward,
)
from .collator import PackingCollator, first_fit_decreasing, pack_sequences, packing_efficiency
from .discovery import PACKING_PATCH_MODULES, find_causal_mask_modules, get_packing_modules
from .mask import (
    UnpadData,
    document_ids_from_position_ids,
    get_seqlens_in_batch,
    get_unpad_data,
    is_indexed_packed_mask,
    validate_indexed_mask,
)
from .patches import (
    SUPPORTED_ATTN_IMPLEMENTATIONS,
    configure_packing,
    create_causal_mask,
    create_sliding_window_causal_mask,
    get_attn_implementation,
    unconfigure_packing,
)
from .version import __version__

__all__ = [
    "PACKING_PATCH_MODULES",
    "SUPPORTED_ATTN_IMPLEMENTATIONS",
    "VARLEN_ATTN_IMPLEMENTATION",
    "PackingCollator",
    "UnpadData",
    "__version__",
    "configure_packing",
    "create_causal_mask",
    "create_sliding_window_causal_mask",
    "document_ids_from_position_ids",
    "document_mask_function",
    "find_causal_mask_modules",
    "first_fit_decreasing",
    "get_attn_implementation",
    "get_packing_modules",
    "get_seqlens_in_batch",
    "get_unpad_data",
    "is_indexed_packed_mask",
    "pack_sequences",
    "packing_efficiency",
    "register_varlen_attention",
    "unconfigure_packing",
    "unregister_varlen_attention",
    "validate_indexed_mask",
    "varlen_attention_forward",
]
