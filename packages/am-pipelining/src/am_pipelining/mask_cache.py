"""Per-stage causal-mask mapping, built once and reused while nothing it depends on changes.

Non-first pipeline stages never see the batch's attention mask, so they rebuild the
`{layer_type: mask}` mapping for every microbatch. Without an explicit `attention_mask` that
mapping depends only on the layer types, the batch/sequence shape, dtype, device, attention
implementation, sliding window and the `position_ids` (packed batches carry per-document
positions, from which transformers derives block-diagonal masks). The cache keys on all of
those, compares `position_ids` by value, and never caches when an `attention_mask` is given
(it may encode per-batch padding).
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ._contract import contract_error, require_parameters

_MASK_FUNCTIONS = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
    "chunked_attention": "create_chunked_causal_mask",
}

_REQUIRED_MASK_PARAMS = ("config", "inputs_embeds", "attention_mask", "past_key_values", "position_ids")


def mask_function(layer_type: str):
    """The transformers mask builder for a layer type, checked against the contract we call it with."""
    from transformers import masking_utils

    name = _MASK_FUNCTIONS.get(layer_type)
    if name is None:
        raise ValueError(
            f"layer type {layer_type!r} has no causal mask builder; pipeline forwards support "
            f"{sorted(_MASK_FUNCTIONS)}"
        )
    fn = getattr(masking_utils, name, None)
    if fn is None:
        raise contract_error(f"transformers.masking_utils.{name}", "the function no longer exists")
    require_parameters(fn, _REQUIRED_MASK_PARAMS, f"transformers.masking_utils.{name}")
    return fn


def _needs_cache_position(fn) -> bool:
    # transformers 5.3 still takes cache_position (required); 5.5 keeps it as an unused BC argument.
    return "cache_position" in inspect.signature(fn).parameters


def build_causal_mask_mapping(
    config: Any,
    inputs_embeds: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
    layer_types: tuple[str, ...],
) -> dict[str, Any]:
    """Build `{layer_type: mask}` with transformers' own mask builders (no cache)."""
    mapping: dict[str, Any] = {}
    for layer_type in layer_types:
        fn = mask_function(layer_type)
        kwargs: dict[str, Any] = dict(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            past_key_values=None,
            position_ids=position_ids,
        )
        if _needs_cache_position(fn):
            kwargs["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
        mapping[layer_type] = fn(**kwargs)
    return mapping


class CausalMaskCache:
    """One stage's cached mask mapping; `hits`/`builds` count reuse for tests and reports."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._position_ids: torch.Tensor | None = None
        self._value: dict[str, Any] | None = None
        self.hits = 0
        self.builds = 0

    def clear(self) -> None:
        self._key = None
        self._position_ids = None
        self._value = None

    @staticmethod
    def _key_for(config, inputs_embeds, position_ids, layer_types) -> tuple:
        pos_meta = None if position_ids is None else (tuple(position_ids.shape), position_ids.dtype)
        return (
            tuple(layer_types),
            tuple(inputs_embeds.shape[:2]),
            inputs_embeds.dtype,
            inputs_embeds.device,
            getattr(config, "_attn_implementation", None),
            getattr(config, "sliding_window", None),
            getattr(config, "attention_chunk_size", None),
            pos_meta,
        )

    def get(
        self,
        config: Any,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor | None,
        position_ids: torch.Tensor | None,
        layer_types: tuple[str, ...],
    ) -> dict[str, Any]:
        """Return the mapping for these inputs, reusing the cached one when every dependency matches."""
        if attention_mask is not None:
            # An explicit mask may differ per batch (padding): always rebuild, never store.
            self.builds += 1
            return build_causal_mask_mapping(config, inputs_embeds, attention_mask, position_ids, layer_types)
        key = self._key_for(config, inputs_embeds, position_ids, layer_types)
        if self._value is not None and key == self._key:
            same_positions = (position_ids is None and self._position_ids is None) or (
                position_ids is not None
                and self._position_ids is not None
                and torch.equal(position_ids, self._position_ids)
            )
            if same_positions:
                self.hits += 1
                return self._value
        value = build_causal_mask_mapping(config, inputs_embeds, None, position_ids, layer_types)
        self.builds += 1
        self._key = key
        self._position_ids = None if position_ids is None else position_ids.detach().clone()
        self._value = value
        return value
