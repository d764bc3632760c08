"""Where a Hugging Face model keeps its text decoder, and what kind of model it is."""

from __future__ import annotations

from torch import nn

from ._args import require_module

#: Attribute names under which VLM wrappers keep their text decoder (checked in this order).
TEXT_MODULE_ATTRS: tuple[str, ...] = ("language_model", "text_model", "text_decoder")

#: Attribute names of multimodal towers/projectors; stage 0 owns them, the other stages drop them.
MULTIMODAL_SUFFIXES: tuple[str, ...] = (
    "vision_tower",
    "visual",
    "vision_model",
    "image_encoder",
    "vision_encoder",
    "embed_vision",
    "multi_modal_projector",
    "mm_projector",
    "audio_tower",
    "embed_audio",
)

#: Class or instance attribute that opts a model out of forward patching (its forward is already PP-aware).
KEEP_SELF_FORWARD_ATTR = "_pp_keep_self_forward"


def get_text_module(model: nn.Module) -> nn.Module:
    """Return the nested text/LLM module if present, else the model itself."""
    require_module(model, "get_text_module")
    for attr in TEXT_MODULE_ATTRS:
        sub = getattr(model, attr, None)
        if isinstance(sub, nn.Module):
            return sub
    return model


def model_keeps_self_forward(model: nn.Module) -> bool:
    """Return True when `model` opts out of pipeline-aware forward patching.

    A model opts out by setting `_pp_keep_self_forward = True` (class or instance), typically because
    its own forward already reads stage-0 inputs such as pixel values from a side channel.
    """
    require_module(model, "model_keeps_self_forward")
    return getattr(model, KEEP_SELF_FORWARD_ATTR, False) is True


def model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None)


def is_vlm(model: nn.Module) -> bool:
    """Best-effort check for a vision-language model (nested text_config, a vision tower, or `visual`)."""
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "text_config", None) is not None:
        if getattr(config, "vision_config", None) is not None:
            return True
    inner = getattr(model, "model", None)
    for owner in (model, inner):
        if owner is None:
            continue
        if any(isinstance(getattr(owner, name, None), nn.Module) for name in ("vision_tower", "visual")):
            return True
    return False


def _vlm_text_backbone(model: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        text = get_text_module(inner)
        if text is not inner:
            return text
    return None


def is_gemma4_vlm(model: nn.Module) -> bool:
    """True only for Gemma4 VLM wrappers (model_type 'gemma4' with model.model.language_model)."""
    return model_type(model) == "gemma4" and _vlm_text_backbone(model) is not None


def is_mistral3_vlm(model: nn.Module) -> bool:
    """True for Mistral3ForConditionalGeneration (Pixtral vision tower + Mistral/Ministral text)."""
    return model_type(model) == "mistral3" and _vlm_text_backbone(model) is not None


def get_decoder(model: nn.Module) -> nn.Module:
    """The module that owns `layers` (the text decoder backbone) of a causal LM, VLM or bare decoder."""
    if hasattr(model, "layers"):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, nn.Module):
        text = get_text_module(inner)
        if hasattr(text, "layers"):
            return text
        if hasattr(inner, "layers"):
            return inner
    text = get_text_module(model)
    if text is not model and hasattr(text, "layers"):
        return text
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected `layers` on the model, on "
        f"`model.model`, or on one of {TEXT_MODULE_ATTRS} inside `model.model`"
    )


def get_text_config(model: nn.Module):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def owned_layers(decoder: nn.Module) -> list[tuple[int, nn.Module]]:
    """(original layer index, layer) for every layer this (possibly split) decoder still holds."""
    layers = decoder.layers
    if isinstance(layers, nn.ModuleDict):
        return [(int(k), layer) for k, layer in layers.items()]
    n = getattr(getattr(decoder, "config", None), "num_hidden_layers", len(layers))
    return list(enumerate(layers))[:n]
