"""Pipeline-compatible forwards for Hugging Face decoders, causal LMs and VLM wrappers.

Every forward here returns a plain tensor (hidden states, or logits when the stage owns the head)
so that `torch.distributed.pipelining` can ship it to the next stage. Each factory returns a
`PipelineForward` (stage_forward.py) around one module-level body: no closures, so a patched model
deep-copies and pickles with forwards bound to the copy.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._contract import transformers_version
from .introspect import get_decoder, get_text_config
from .mask_cache import CausalMaskCache
from .output_path import causal_lm_logits
from .run_layers import embed_ids, run_decoder_layers, stage_input
from .stage_forward import PipelineForward, StageCall


def _hidden_from(output: Any) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        return output
    hidden = getattr(output, "last_hidden_state", None)
    if hidden is not None:
        return hidden
    return output[0]


def apply_lm_head(
    model: nn.Module, hidden: torch.Tensor, logits_to_keep: int | torch.Tensor | None = 0
) -> torch.Tensor:
    """The causal LM's own head step (output_path.causal_lm_logits) when this stage owns lm_head; else hidden states."""
    if getattr(model, "lm_head", None) is None:
        return hidden
    return causal_lm_logits(model, get_decoder(model), hidden, logits_to_keep)


def _backbone_then_head(
    model: nn.Module,
    backbone: nn.Module,
    call: StageCall,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
) -> torch.Tensor:
    """The stage's (patched) text backbone, then the head when this stage owns it."""
    out = backbone(
        input_ids=input_ids,
        attention_mask=call.attention_mask,
        position_ids=call.position_ids,
        inputs_embeds=inputs_embeds,
        **call.kwargs,
    )
    return apply_lm_head(model, _hidden_from(out), call.options.get("logits_to_keep"))


def _embeds_token_ids(call: StageCall) -> bool:
    ids = call.input_ids
    return call.inputs_embeds is None and ids is not None and not ids.is_floating_point()


def _require_vision_tower(vlm: nn.Module) -> None:
    if getattr(vlm, "vision_tower", None) is None:
        raise ValueError("pixel_values reached a stage without the vision tower (only stage 0 has it)")


def _require_gemma4() -> Any:
    try:
        from transformers.models.gemma4 import modeling_gemma4
    except ImportError as exc:
        raise ImportError(
            f"Gemma4 pipeline forwards need a transformers with Gemma4 (5.5+); installed transformers "
            f"{transformers_version()} has none ({exc})"
        ) from exc
    return modeling_gemma4


def _check_mask_cache(mask_cache: Any) -> CausalMaskCache:
    if mask_cache is None:
        return CausalMaskCache()
    if not isinstance(mask_cache, CausalMaskCache):
        raise TypeError(f"mask_cache must be a CausalMaskCache or None, got {type(mask_cache).__name__}")
    return mask_cache


# ---- bodies (module level, so that the forwards pickle) -------------------------------------------


def _inner_body(module: nn.Module, call: StageCall, cache: CausalMaskCache | None) -> torch.Tensor:
    hidden = stage_input(module, call.input_ids, call.inputs_embeds, call.attention_mask, call.position_ids)
    return run_decoder_layers(module, hidden, call.attention_mask, call.position_ids, cache, call.kwargs)


def _causal_lm_body(module: nn.Module, call: StageCall, cache: CausalMaskCache | None) -> torch.Tensor:
    return _backbone_then_head(module, get_decoder(module), call, call.input_ids, call.inputs_embeds)


def _mistral3_vlm_body(module: nn.Module, call: StageCall, cache: CausalMaskCache | None) -> torch.Tensor:
    vlm = module.model
    text = vlm.language_model
    input_ids, inputs_embeds = call.input_ids, call.inputs_embeds
    pixel_values = call.options["pixel_values"]
    if _embeds_token_ids(call):
        inputs_embeds = embed_ids(text, input_ids)
        if pixel_values is not None:
            _require_vision_tower(vlm)
            layer = call.options["vision_feature_layer"]
            features = vlm.get_image_features(
                pixel_values=pixel_values,
                image_sizes=call.options["image_sizes"],
                vision_feature_layer=module.config.vision_feature_layer if layer is None else layer,
                return_dict=True,
            ).pooler_output
            features = torch.cat(list(features), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            mask = vlm.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=features)
            inputs_embeds = inputs_embeds.masked_scatter(mask, features)
        input_ids = None
    return _backbone_then_head(module, text, call, input_ids, inputs_embeds)


def _gemma4_text_body(module: nn.Module, call: StageCall, cache: CausalMaskCache | None) -> torch.Tensor:
    kv_dict = getattr(_require_gemma4(), "KVSharingDict", None)
    ids = call.input_ids
    token_ids = ids if ids is not None and not ids.is_floating_point() else None
    hidden = stage_input(module, ids, call.inputs_embeds, call.attention_mask, call.position_ids)
    per_layer_inputs = call.options["per_layer_inputs"]
    if getattr(module, "hidden_size_per_layer_input", 0):
        if per_layer_inputs is None and token_ids is None:
            raise ValueError(
                "Gemma4 per-layer inputs are computed from token ids, which only stage 0 sees; "
                "build the model with hidden_size_per_layer_input=0 to pipeline it"
            )
        if per_layer_inputs is None:
            per_layer_inputs = module.get_per_layer_inputs(token_ids, hidden)
        per_layer_inputs = module.project_per_layer_inputs(hidden, per_layer_inputs)
    return run_decoder_layers(
        module,
        hidden,
        call.attention_mask,
        call.position_ids,
        cache,
        call.kwargs,
        per_layer_inputs=per_layer_inputs,
        shared_kv_states=kv_dict() if kv_dict is not None else {},
    )


def _gemma4_vlm_body(module: nn.Module, call: StageCall, cache: CausalMaskCache | None) -> torch.Tensor:
    vlm = module.model
    text = vlm.language_model
    input_ids, inputs_embeds = call.input_ids, call.inputs_embeds
    per_layer_inputs = call.options["per_layer_inputs"]
    pixel_values = call.options["pixel_values"]
    if _embeds_token_ids(call):
        special = [
            getattr(module.config, n, None) for n in ("image_token_id", "video_token_id", "audio_token_id")
        ]
        mm_mask = torch.zeros_like(input_ids, dtype=torch.bool)
        for token_id in special:
            if token_id is not None:
                mm_mask |= input_ids == token_id
        # Multimodal placeholder ids can lie outside the text vocabulary: embed them as padding.
        llm_ids = input_ids.masked_fill(mm_mask, get_text_config(module).pad_token_id)
        inputs_embeds = embed_ids(text, llm_ids)
        if getattr(text, "hidden_size_per_layer_input", 0):
            per_layer_inputs = text.get_per_layer_inputs(llm_ids, inputs_embeds)
        if pixel_values is not None:
            _require_vision_tower(vlm)
            features = vlm.get_image_features(
                pixel_values, call.options["image_position_ids"], return_dict=True
            ).pooler_output
            features = features.to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask = (input_ids == module.config.image_token_id).unsqueeze(-1).expand_as(inputs_embeds)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, features)
        input_ids = None
    if per_layer_inputs is not None:
        call.kwargs["per_layer_inputs"] = per_layer_inputs
    return _backbone_then_head(module, text, call, input_ids, inputs_embeds)


# ---- the seed's factories --------------------------------------------------------------------------


def create_pipeline_forward_inner(
    model_class_name: str = "AutoModel", *, mask_cache: CausalMaskCache | None = None
) -> PipelineForward:
    """Create a pipeline-compatible forward for a HF decoder backbone (returns hidden states).

    `model_class_name` only labels the forward (its `__qualname__`), as in the seed.
    """
    if not isinstance(model_class_name, str):
        raise TypeError(f"model_class_name must be a str, got {type(model_class_name).__name__}")
    return PipelineForward(
        _inner_body, label=f"{model_class_name}.pipeline_forward", mask_cache=_check_mask_cache(mask_cache)
    )


def create_pipeline_forward_causal_lm() -> PipelineForward:
    """Create a pipeline-compatible forward for causal LM wrappers (returns logits or hidden states)."""
    return PipelineForward(
        _causal_lm_body, label="CausalLM.pipeline_forward", takes=("logits_to_keep",), to_backbone=True
    )


def create_pipeline_forward_mistral3_vlm() -> PipelineForward:
    """Pipeline forward for Mistral3ForConditionalGeneration: images merged on stage 0, lm_head last.

    `pixel_values`/`image_sizes` (and `vision_feature_layer`, else the config's) are consumed by the
    stage that embeds token ids; later stages receive hidden states with the image features already
    merged, so they do not use them again.
    """
    return PipelineForward(
        _mistral3_vlm_body,
        label="Mistral3ForConditionalGeneration.pipeline_forward",
        takes=("pixel_values", "image_sizes", "vision_feature_layer", "logits_to_keep"),
        to_backbone=True,
    )


def create_pipeline_forward_gemma4_text(*, mask_cache: CausalMaskCache | None = None) -> PipelineForward:
    """Pipeline forward for the Gemma4 text backbone: mixed sliding/full masks, per-layer-type rotary.

    Per-layer inputs (`hidden_size_per_layer_input`) are computed from token ids, so they are only
    supported on a stage that holds `embed_tokens` and every layer; KV sharing needs the shared
    layers and their sources on one stage (validate_hf_model_for_pipeline_support reports both).
    """
    _require_gemma4()
    return PipelineForward(
        _gemma4_text_body,
        label="Gemma4TextModel.pipeline_forward",
        takes=("per_layer_inputs",),
        mask_cache=_check_mask_cache(mask_cache),
    )


def create_pipeline_forward_gemma4_vlm() -> PipelineForward:
    """Pipeline forward for Gemma4ForConditionalGeneration: images merged on stage 0, softcapped logits last.

    As for Mistral3, `pixel_values` are consumed by the stage that embeds token ids.
    """
    _require_gemma4()
    return PipelineForward(
        _gemma4_vlm_body,
        label="Gemma4ForConditionalGeneration.pipeline_forward",
        takes=("pixel_values", "image_position_ids", "per_layer_inputs", "logits_to_keep"),
        to_backbone=True,
    )
