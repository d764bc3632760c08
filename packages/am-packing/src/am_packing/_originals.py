"""transformers' own mask builders as captured by `configure_packing`, and the markers of our pass-throughs.

A leaf module (it imports nothing from this package) so that every module that needs the unpatched
builders (the pass-throughs, the contract probes of `register_varlen_attention` and `enable_packing`)
reads them here instead of reaching into `patches`.
"""

from __future__ import annotations

from typing import Any

from ._patch import patch_name

# masking_utils functions whose module-level references configure_packing replaces with pass-throughs.
MASK_BUILDERS: tuple[str, ...] = ("create_causal_mask", "create_sliding_window_causal_mask")

# builder name -> transformers' function, recorded when configure_packing builds its patches.
ORIGINALS: dict[str, Any] = {}


def passthrough_marker(builder: str) -> str:
    """The `__am_patch__` marker of our pass-through for `builder`."""
    return f"am_packing.{builder}"


def is_passthrough(obj: Any, builder: str) -> bool:
    return patch_name(obj) == passthrough_marker(builder)


def unpatched_builder(masking: Any, builder: str) -> Any:
    """transformers' own `builder`: the live ``masking_utils`` attribute, or its original while ours is live."""
    live = getattr(masking, builder, None)
    if not is_passthrough(live, builder):
        return live
    if builder not in ORIGINALS:
        raise RuntimeError(
            f"transformers.masking_utils.{builder} is am-packing's pass-through but its original is unknown"
        )
    return ORIGINALS[builder]


# Prefix of the attn_implementation names `enable_packing` registers (``am_packed_sdpa``, ...): a config
# naming one belongs to a model whose own mask interface applies the document ids.
SCOPED_PREFIX = "am_packed_"
