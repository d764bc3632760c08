"""Pipeline-compatible forwards for Hugging Face decoders, causal LMs and VLM wrappers.

Every forward here returns a plain tensor (hidden states, or logits when the stage owns the
head) so that `torch.distributed.pipelining` can ship it to the next stage. A stage whose
`embed_tokens` was removed receives the previous stage's hidden states in the `input_ids`
slot; layers are the ones the (possibly split) decoder still holds, each with its original
index, so per-layer types (sliding/full attention) and rotary embeddings stay right.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._contract import RENAMED_PARAMETERS, parameter_name, qualified_name, transformers_version
from .introspect import get_decoder, get_text_config, owned_layers
from .mask_cache import CausalMaskCache

Forward = Callable[..., torch.Tensor]


def layer_type_of(config: Any, index: int) -> str:
    """Attention type of layer `index`: `config.layer_types`, else sliding when `sliding_window` is set."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    if getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True):
        return "sliding_attention"
    return "full_attention"


def _reject_cache(kwargs: dict[str, Any], use_cache: bool | None) -> None:
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


def stage_input(
    module: nn.Module, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor:
    """Embed token ids on the stage that owns `embed_tokens`; pass hidden states through elsewhere."""
    if inputs_embeds is not None:
        return inputs_embeds
    if input_ids is None:
        raise ValueError("pipeline forward needs input_ids (token ids or the previous stage's hidden states)")
    if input_ids.is_floating_point():
        return input_ids
    embed = getattr(module, "embed_tokens", None)
    if embed is None:
        raise ValueError(
            f"{type(module).__name__} has no embed_tokens (not the first stage) but received integer "
            f"input_ids of shape {tuple(input_ids.shape)}; expected the previous stage's hidden states"
        )
    return embed(input_ids)


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
    """Masks, rotary embeddings, the owned layers and (if owned) the final norm of one stage."""
    _refuse_block_overlay(layer_kwargs)
    config = module.config
    if position_ids is None:
        position_ids = torch.arange(hidden_states.shape[1], device=hidden_states.device).unsqueeze(0)
    position_ids, rotary_position_ids = split_mrope_positions(config, position_ids)
    layers = owned_layers(module)
    types = {idx: layer_type_of(config, idx) for idx, _ in layers}
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

    norm = getattr(module, "norm", None)
    if norm is not None:
        hidden_states = norm(hidden_states)
    return hidden_states


def create_pipeline_forward_inner(
    model_class_name: str = "AutoModel", *, mask_cache: CausalMaskCache | None = None
) -> Forward:
    """Create a pipeline-compatible forward for a HF decoder backbone (returns hidden states).

    `model_class_name` only labels the forward (its `__qualname__`), as in the seed.
    """
    cache = mask_cache if mask_cache is not None else CausalMaskCache()

    def pipeline_forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        _reject_cache(kwargs, use_cache)
        kwargs.pop("cache_position", None)
        hidden = stage_input(self, input_ids, inputs_embeds)
        return run_decoder_layers(self, hidden, attention_mask, position_ids, cache, kwargs)

    pipeline_forward.__qualname__ = f"{model_class_name}.pipeline_forward"
    pipeline_forward.mask_cache = cache  # type: ignore[attr-defined]
    return pipeline_forward


def _hidden_from(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    return output[0]


def apply_lm_head(
    model: nn.Module, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor = 0
) -> torch.Tensor:
    """lm_head (+ final-logit softcapping) when this stage owns the head; hidden states otherwise."""
    head = getattr(model, "lm_head", None)
    if head is None:
        return hidden
    if isinstance(logits_to_keep, int) and logits_to_keep > 0:
        hidden = hidden[:, -logits_to_keep:, :]
    elif isinstance(logits_to_keep, torch.Tensor):
        hidden = hidden[:, logits_to_keep, :]
    logits = head(hidden)
    cap = getattr(get_text_config(model), "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _backbone_then_head(
    model: nn.Module,
    backbone: nn.Module,
    input_ids: torch.Tensor | None,
    attention_mask: Any,
    position_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    logits_to_keep: int | torch.Tensor,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    """The stage's (patched) text backbone, then the head when this stage owns it."""
    out = backbone(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        inputs_embeds=inputs_embeds,
        **kwargs,
    )
    return apply_lm_head(model, _hidden_from(out), logits_to_keep)


def _require_vision_tower(vlm: nn.Module) -> None:
    if getattr(vlm, "vision_tower", None) is None:
        raise ValueError("pixel_values reached a stage without the vision tower (only stage 0 has it)")


def create_pipeline_forward_causal_lm() -> Forward:
    """Create a pipeline-compatible forward for causal LM wrappers (returns logits or hidden states)."""

    def pipeline_forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        _reject_cache(kwargs, use_cache)
        if labels is not None:
            raise ValueError("pipeline forwards return logits; compute the loss in the schedule's loss_fn")
        return _backbone_then_head(
            self,
            get_decoder(self),
            input_ids,
            attention_mask,
            position_ids,
            inputs_embeds,
            logits_to_keep,
            kwargs,
        )

    return pipeline_forward


def create_pipeline_forward_mistral3_vlm() -> Forward:
    """Pipeline forward for Mistral3ForConditionalGeneration: images merged on stage 0, lm_head last.

    `pixel_values`/`image_sizes` are consumed by the stage that embeds token ids; later stages receive
    hidden states with the image features already merged, so they do not use them again.
    """

    def pipeline_forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        _reject_cache(kwargs, use_cache)
        vlm = self.model
        text = vlm.language_model
        if inputs_embeds is None and input_ids is not None and not input_ids.is_floating_point():
            inputs_embeds = stage_input(text, input_ids, None)
            if pixel_values is not None:
                _require_vision_tower(vlm)
                features = vlm.get_image_features(
                    pixel_values=pixel_values,
                    image_sizes=image_sizes,
                    vision_feature_layer=self.config.vision_feature_layer,
                    return_dict=True,
                ).pooler_output
                features = torch.cat(list(features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
                mask = vlm.get_placeholder_mask(
                    input_ids, inputs_embeds=inputs_embeds, image_features=features
                )
                inputs_embeds = inputs_embeds.masked_scatter(mask, features)
            input_ids = None
        return _backbone_then_head(
            self, text, input_ids, attention_mask, position_ids, inputs_embeds, logits_to_keep, kwargs
        )

    return pipeline_forward


def _require_gemma4() -> Any:
    try:
        from transformers.models.gemma4 import modeling_gemma4
    except ImportError as exc:
        raise ImportError(
            f"Gemma4 pipeline forwards need a transformers with Gemma4 (5.5+); installed transformers "
            f"{transformers_version()} has none ({exc})"
        ) from exc
    return modeling_gemma4


def create_pipeline_forward_gemma4_text(*, mask_cache: CausalMaskCache | None = None) -> Forward:
    """Pipeline forward for the Gemma4 text backbone: mixed sliding/full masks, per-layer-type rotary.

    Per-layer inputs (`hidden_size_per_layer_input`) are computed from token ids, so they are only
    supported on a stage that holds `embed_tokens` and every layer; KV sharing needs the shared
    layers and their sources on one stage (validate_hf_model_for_pipeline_support reports both).
    """
    modeling_gemma4 = _require_gemma4()
    kv_dict = getattr(modeling_gemma4, "KVSharingDict", None)
    cache = mask_cache if mask_cache is not None else CausalMaskCache()

    def pipeline_forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        per_layer_inputs: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        _reject_cache(kwargs, use_cache)
        kwargs.pop("cache_position", None)
        token_ids = input_ids if input_ids is not None and not input_ids.is_floating_point() else None
        hidden = stage_input(self, input_ids, inputs_embeds)
        if getattr(self, "hidden_size_per_layer_input", 0):
            if per_layer_inputs is None and token_ids is None:
                raise ValueError(
                    "Gemma4 per-layer inputs are computed from token ids, which only stage 0 sees; "
                    "build the model with hidden_size_per_layer_input=0 to pipeline it"
                )
            if per_layer_inputs is None:
                per_layer_inputs = self.get_per_layer_inputs(token_ids, hidden)
            per_layer_inputs = self.project_per_layer_inputs(hidden, per_layer_inputs)
        shared = kv_dict() if kv_dict is not None else {}
        return run_decoder_layers(
            self,
            hidden,
            attention_mask,
            position_ids,
            cache,
            kwargs,
            per_layer_inputs=per_layer_inputs,
            shared_kv_states=shared,
        )

    pipeline_forward.mask_cache = cache  # type: ignore[attr-defined]
    return pipeline_forward


def create_pipeline_forward_gemma4_vlm() -> Forward:
    """Pipeline forward for Gemma4ForConditionalGeneration: images merged on stage 0, softcapped logits last.

    As for Mistral3, `pixel_values` are consumed by the stage that embeds token ids.
    """
    _require_gemma4()

    def pipeline_forward(
        self: nn.Module,
        input_ids: torch.Tensor | None = None,
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_position_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> torch.Tensor:
        _reject_cache(kwargs, use_cache)
        vlm = self.model
        text = vlm.language_model
        text_config = get_text_config(self)
        if inputs_embeds is None and input_ids is not None and not input_ids.is_floating_point():
            special = [
                getattr(self.config, n, None) for n in ("image_token_id", "video_token_id", "audio_token_id")
            ]
            mm_mask = torch.zeros_like(input_ids, dtype=torch.bool)
            for token_id in special:
                if token_id is not None:
                    mm_mask |= input_ids == token_id
            # Multimodal placeholder ids can lie outside the text vocabulary: embed them as padding.
            llm_ids = input_ids.masked_fill(mm_mask, text_config.pad_token_id)
            inputs_embeds = stage_input(text, llm_ids, None)
            if getattr(text, "hidden_size_per_layer_input", 0):
                kwargs["per_layer_inputs"] = text.get_per_layer_inputs(llm_ids, inputs_embeds)
            if pixel_values is not None:
                _require_vision_tower(vlm)
                features = vlm.get_image_features(
                    pixel_values, image_position_ids, return_dict=True
                ).pooler_output
                features = features.to(inputs_embeds.device, inputs_embeds.dtype)
                image_mask = (input_ids == self.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
                inputs_embeds = inputs_embeds.masked_scatter(image_mask, features)
            input_ids = None
        return _backbone_then_head(
            self, text, input_ids, attention_mask, position_ids, inputs_embeds, logits_to_keep, kwargs
        )

    return pipeline_forward
