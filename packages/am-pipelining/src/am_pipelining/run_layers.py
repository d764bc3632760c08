"""What one pipeline stage runs: its masks, rotary embeddings, the layers it holds and the final modules.

A stage whose `embed_tokens` was removed receives the previous stage's hidden states in the
`input_ids` slot; layers are the ones the (possibly split) decoder still holds, each with its
original index, so per-layer types (sliding/full attention) and rotary embeddings stay right.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._contract import RENAMED_PARAMETERS, parameter_name, qualified_name
from .introspect import owned_layers
from .mask_cache import CausalMaskCache
from .output_path import apply_final_modules, decoder_prologue


def _fallback_layer_type(config: Any) -> str:
    # No per-layer record anywhere: Mistral-style configs window every layer when `sliding_window` is set.
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    return "full_attention"


def layer_type_of(config: Any, index: int, layer: nn.Module | None = None) -> str:
    """Attention type of layer `index`, as the unsplit decoder picks its mask.

    Decoders read either the type each layer recorded when it was built (`layer.attention_type`,
    transformers 5.3) or `config.layer_types[index]` at call time (5.5+); the two agree unless the
    config was changed after the model was built, and then no stage forward can know which one the
    installed decoder reads: that raises ValueError. Without either, `sliding_window` decides.
    """
    recorded = getattr(layer, "attention_type", None) if layer is not None else None
    layer_types = getattr(config, "layer_types", None)
    configured = layer_types[index] if layer_types else None
    if isinstance(recorded, str) and configured is not None and recorded != configured:
        raise ValueError(
            f"model_type {getattr(config, 'model_type', None)!r}: layer {index} was built as {recorded!r} "
            f"but config.layer_types[{index}] is now {configured!r} (the config changed after the model was "
            "built); transformers versions differ in which of the two the decoder reads, so the stage "
            "forward cannot be exact: rebuild the model from the changed config"
        )
    if configured is not None:
        return configured
    if isinstance(recorded, str):
        return recorded
    return _fallback_layer_type(config)


def stage_layer_types(decoder: nn.Module) -> dict[int, str]:
    """{original layer index: attention type} for every layer the (possibly split) decoder holds."""
    config = decoder.config
    return {idx: layer_type_of(config, idx, layer) for idx, layer in owned_layers(decoder)}


def reject_cache(kwargs: dict[str, Any], use_cache: bool | None) -> None:
    """Refuse a KV cache under any spelling transformers used for it, removing the cache arguments.

    Callers written for either side of a rename (`past_key_values`, 5.24's `cache`) pass `None`
    under their spelling; dropping it here keeps it out of the layers' **kwargs.
    """
    given = {name: kwargs.pop(name) for name in RENAMED_PARAMETERS["past_key_values"] if name in kwargs}
    caches = {name: type(value).__name__ for name, value in given.items() if value is not None}
    if caches or use_cache:
        raise ValueError(
            f"pipeline forwards run without a KV cache; got use_cache={use_cache!r}"
            + "".join(f", {name}={kind}" for name, kind in caches.items())
            + "; pass use_cache=False"
        )


def _refuse_block_overlay(kwargs: dict[str, Any]) -> None:
    # The unsplit model would drop `block_sequence_ids` into the layers' **kwargs unused; the mask
    # builders (5.23+) read it as a bidirectional image-block overlay whose composition is model
    # specific. Neither is what a caller passing it means, and it is not document packing
    # (that comes from position_ids), so say so instead of ignoring it.
    if kwargs.get("block_sequence_ids") is not None:
        raise ValueError(
            "block_sequence_ids (a bidirectional image-block overlay) is not applied by pipeline "
            "forwards, which build causal masks; for packed documents pass per-document position_ids, "
            "for a custom mask pass attention_mask={layer_type: mask}"
        )


def embed_ids(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """The plain input embedding of token ids (what VLM wrappers merge image features into)."""
    embed = getattr(module, "embed_tokens", None)
    if embed is None:
        raise ValueError(
            f"{type(module).__name__} has no embed_tokens (not the first stage) but received integer "
            f"input_ids of shape {tuple(input_ids.shape)}; expected the previous stage's hidden states"
        )
    return embed(input_ids)


def stage_input(
    module: nn.Module,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: Any = None,
    position_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The first layer's input on the stage that owns `embed_tokens`; hidden states pass through elsewhere.

    On the first stage, token ids or embeddings go through the decoder's own forward up to its first
    layer (output_path.decoder_prologue), so positions, scales or norms it applies there are kept.
    """
    if input_ids is None and inputs_embeds is None:
        raise ValueError("pipeline forward needs input_ids (token ids or the previous stage's hidden states)")
    if inputs_embeds is None and input_ids.is_floating_point():
        return input_ids
    if getattr(module, "embed_tokens", None) is None:
        if inputs_embeds is not None:
            return inputs_embeds
        embed_ids(module, input_ids)  # raises: token ids on a stage without the embedding
    if position_ids is not None:
        split_mrope_positions(module.config, position_ids)  # raises ValueError for a shape it cannot take
    layers = [layer for _, layer in owned_layers(module)]
    if not layers:
        return embed_ids(module, input_ids) if inputs_embeds is None else inputs_embeds
    ids = None if inputs_embeds is not None else input_ids
    return decoder_prologue(module, ids, inputs_embeds, attention_mask, position_ids, layers)


def _accepts(fn: Callable, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def layer_cache_parameter(layer_cls: type) -> str:
    """The name under which `layer_cls.forward` takes its KV cache (`past_key_values`, or `cache` from 5.24).

    Passing None under the declared name, never the other one, keeps the old name out of a
    deprecation shim (5.24 warns) and out of **kwargs, where a layer would forward it unread.
    """
    forward = layer_cls.forward
    return parameter_name(forward, "past_key_values", qualified_name(forward))


def uses_mrope(config: Any) -> bool:
    """True for multimodal rotary embeddings (Qwen2-VL style) that take `[3, B, S]` position ids."""
    for attr in ("rope_parameters", "rope_scaling"):
        rope = getattr(config, attr, None)
        if isinstance(rope, dict) and "mrope_section" in rope:
            return True
    return False


def split_mrope_positions(
    config: Any, position_ids: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(text positions for masks and layers, positions for the rotary embedding).

    2D `[B, S]` positions are the text positions; an mrope rotary gets them expanded to
    `[3, B, S]`, as the transformers text model does before calling it. 3D positions are
    `[3, B, S]` (temporal/height/width) or `[4, B, S]` with the text row first (transformers'
    packed layout): the rotary gets the three mrope rows. With four rows the masks get the text
    row; with three, the first row when all three agree (text-only input, so packing still
    works), else None as in transformers: image tokens repeat temporal positions, which the
    packed-sequence detection of the mask builders would read as one document per token.
    """
    if position_ids.ndim == 2:
        if uses_mrope(config):
            return position_ids, position_ids[None].expand(3, *position_ids.shape)
        return position_ids, position_ids
    if position_ids.ndim != 3 or position_ids.shape[0] not in (3, 4) or not uses_mrope(config):
        raise ValueError(
            f"position_ids must be [batch, seq] (or, for mrope models, [3, batch, seq] / [4, batch, seq]); "
            f"got shape {tuple(position_ids.shape)} for model_type {getattr(config, 'model_type', None)!r}"
        )
    if position_ids.shape[0] == 4:
        return position_ids[0], position_ids[1:]
    first = position_ids[0]
    text = first if bool((position_ids == first).all()) else None
    return text, position_ids


def run_decoder_layers(
    module: nn.Module,
    hidden_states: torch.Tensor,
    attention_mask: Any,
    position_ids: torch.Tensor | None,
    cache: CausalMaskCache,
    layer_kwargs: dict[str, Any],
    *,
    per_layer_inputs: torch.Tensor | None = None,
    shared_kv_states: Any = None,
) -> torch.Tensor:
    """Masks, rotary embeddings, the owned layers and (if owned) the final modules of one stage."""
    _refuse_block_overlay(layer_kwargs)
    config = module.config
    if position_ids is None:
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
    position_ids, rotary_position_ids = split_mrope_positions(config, position_ids)
    layers = owned_layers(module)
    types = stage_layer_types(module)
    needed = tuple(sorted(set(types.values())))
    if isinstance(attention_mask, dict):
        mapping = attention_mask
    else:
        mapping = cache.get(config, hidden_states, attention_mask, position_ids, needed) if needed else {}

    rotary = getattr(module, "rotary_emb", None)
    position_embeddings: dict[str, Any] = {}
    if rotary is not None and needed:
        if _accepts(type(rotary).forward, "layer_type"):
            for lt in needed:
                position_embeddings[lt] = rotary(hidden_states, rotary_position_ids, lt)
        else:
            shared = rotary(hidden_states, rotary_position_ids)
            position_embeddings = dict.fromkeys(needed, shared)

    cache_position = None
    for idx, layer in layers:
        lt = types[idx]
        call_kwargs = dict(layer_kwargs)
        call_kwargs[layer_cache_parameter(type(layer))] = None
        if _accepts(type(layer).forward, "cache_position"):
            # transformers 5.3 layers still take cache_position; later versions dropped it.
            if cache_position is None:
                cache_position = torch.arange(hidden_states.shape[1], device=hidden_states.device)
            call_kwargs["cache_position"] = cache_position
        if shared_kv_states is not None:
            call_kwargs["shared_kv_states"] = shared_kv_states
        args: tuple = (hidden_states,)
        if per_layer_inputs is not None:
            args = (hidden_states, per_layer_inputs[:, :, idx, :])
        out = layer(
            *args,
            attention_mask=mapping.get(lt),
            position_embeddings=position_embeddings.get(lt),
            position_ids=position_ids,
            **call_kwargs,
        )
        hidden_states = out[0] if isinstance(out, tuple) else out

    return apply_final_modules(module, hidden_states)
