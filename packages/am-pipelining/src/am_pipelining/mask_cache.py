"""Per-stage causal-mask mapping, built once and reused while nothing it depends on changes.

Non-first pipeline stages never see the batch's attention mask, so they rebuild the
`{layer_type: mask}` mapping for every microbatch. Without an explicit `attention_mask` that
mapping depends only on the builders and the mask function registered for the attention
implementation, the batch/sequence shape, dtype, device, the config fields the builders read
(`is_causal`, sliding window, chunk size) and the `position_ids` (packed batches carry
per-document positions, from which transformers derives block-diagonal masks). The cache keys on
all of those, compares `position_ids` by value, and never caches when an `attention_mask` is given
(it may encode per-batch padding).

The builders are called without a KV cache (under whichever name they declare: `past_key_values`
up to 5.23, `cache` from 5.24) and without `block_sequence_ids` (5.23+: a bidirectional overlay
for image tokens, which is not document packing) or `layer_idx` (it only sizes masks against a
cache), so the masks are the causal ones the unsplit decoder builds.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch

from ._contract import contract_error, parameter_name, qualified_name, require_parameters

_MASK_FUNCTIONS = {
    "full_attention": "create_causal_mask",
    "sliding_attention": "create_sliding_window_causal_mask",
    "chunked_attention": "create_chunked_causal_mask",
}

_REQUIRED_MASK_PARAMS = ("config", "inputs_embeds", "attention_mask", "position_ids")
_FORWARDING_KINDS = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)

# Config fields the mask builders read besides `_attn_implementation` (bidirectional fallback, windows).
_MASK_CONFIG_FIELDS = ("is_causal", "sliding_window", "attention_chunk_size")


def _label(name: str) -> str:
    return f"transformers.masking_utils.{name}"


def mask_function(layer_type: str) -> Callable[..., Any]:
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
        raise contract_error(_label(name), "the function no longer exists")
    _require_declared_parameters(fn, _label(name))
    parameter_name(fn, "past_key_values", _label(name))
    return fn


def _require_declared_parameters(fn: Callable[..., Any], label: str) -> None:
    sig = require_parameters(fn, _REQUIRED_MASK_PARAMS, label)
    if all(p.kind in _FORWARDING_KINDS for p in sig.parameters.values()):
        # A pass-through (another package's patch) that hides what it forwards to: the KV-cache and
        # cache_position names we must call it with cannot be read off `(*args, **kwargs)`.
        raise contract_error(
            label,
            f"is {qualified_name(fn)}{sig}, a wrapper that hides the builder's parameters; it must expose "
            "the signature it forwards to (functools.wraps, __wrapped__ or __signature__)",
        )


def _call_extras(fn: Callable[..., Any], layer_type: str, inputs_embeds: torch.Tensor) -> dict[str, Any]:
    """Arguments besides the inputs: no KV cache, by the name `fn` declares; cache_position where taken."""
    cache_name = parameter_name(fn, "past_key_values", _label(_MASK_FUNCTIONS[layer_type]))
    extras: dict[str, Any] = {cache_name: None}
    # transformers 5.3 still takes cache_position (required); 5.5 keeps it as an unused BC argument.
    if "cache_position" in inspect.signature(fn).parameters:
        extras["cache_position"] = torch.arange(inputs_embeds.shape[1], device=inputs_embeds.device)
    return extras


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
        mapping[layer_type] = fn(
            config=config,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            **_call_extras(fn, layer_type, inputs_embeds),
        )
    return mapping


def _mask_interface(config: Any) -> Any:
    # The mask function registered for the attention implementation shapes every mask; a
    # re-registration (AttentionMaskInterface.register) must not be served a mask built before it.
    from transformers import masking_utils

    registry = getattr(masking_utils, "ALL_MASK_ATTENTION_FUNCTIONS", None)
    impl = getattr(config, "_attn_implementation", None)
    return registry.get(impl) if registry is not None and impl is not None else None


class CausalMaskCache:
    """One stage's cached mask mapping; `hits`/`builds` count reuse for tests and reports."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._position_ids: torch.Tensor | None = None
        self._value: dict[str, Any] | None = None
        self.hits = 0
        self.builds = 0

    def __reduce__(self) -> tuple:
        # A copy (deepcopy, pickle, torch.save) starts empty: masks are derived data, and the key holds
        # the builder functions, which need not pickle (a patched builder may be a local function).
        return (CausalMaskCache, ())

    def clear(self) -> None:
        self._key = None
        self._position_ids = None
        self._value = None

    @staticmethod
    def _key_for(config, inputs_embeds, position_ids, layer_types) -> tuple:
        pos_meta = None if position_ids is None else (tuple(position_ids.shape), position_ids.dtype)
        return (
            tuple(layer_types),
            # the builders themselves (a patched builder must not be served masks of the original one)
            tuple(mask_function(lt) for lt in layer_types),
            _mask_interface(config),
            tuple(inputs_embeds.shape[:2]),
            inputs_embeds.dtype,
            inputs_embeds.device,
            getattr(config, "_attn_implementation", None),
            tuple(getattr(config, field, None) for field in _MASK_CONFIG_FIELDS),
            pos_meta,
        )

    def _holds(self, key: tuple, position_ids: torch.Tensor | None) -> bool:
        if self._value is None or key != self._key:
            return False
        if position_ids is None or self._position_ids is None:
            return position_ids is None and self._position_ids is None
        return torch.equal(position_ids, self._position_ids)

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
        if self._holds(key, position_ids):
            self.hits += 1
            return self._value
        value = build_causal_mask_mapping(config, inputs_embeds, None, position_ids, layer_types)
        self.builds += 1
        self._key = key
        self._position_ids = None if position_ids is None else position_ids.detach().clone()
        self._value = value
        return value
