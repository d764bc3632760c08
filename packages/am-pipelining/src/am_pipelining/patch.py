"""patch_hf_model_for_pp: swap in pipeline-compatible forwards on one model's instances (reversible)."""

from __future__ import annotations

import types
import weakref
from typing import Any

from torch import nn

from ._contract import contract_error, qualified_name, require_parameters
from ._patch import Patch, PatchSet, mark
from .forwards import (
    create_pipeline_forward_causal_lm,
    create_pipeline_forward_gemma4_text,
    create_pipeline_forward_gemma4_vlm,
    create_pipeline_forward_inner,
    create_pipeline_forward_mistral3_vlm,
    layer_cache_parameter,
    layer_type_of,
)
from .introspect import get_decoder, is_gemma4_vlm, is_mistral3_vlm, model_type, owned_layers
from .mask_cache import mask_function

_LAYER_PARAMS = ("attention_mask", "position_embeddings", "position_ids")

# model -> its live PatchSet, so unpatch_hf_model_for_pp(model) finds what to undo.
_ACTIVE: weakref.WeakKeyDictionary[nn.Module, PatchSet] = weakref.WeakKeyDictionary()


def _decoder_contract(decoder: nn.Module):
    """Check the transformers pieces the pipeline forward calls, before anything is patched."""

    def check(_live: Any) -> None:
        if not hasattr(decoder, "layers"):
            raise contract_error(f"{type(decoder).__qualname__}", "has no `layers` attribute")
        config = decoder.config
        layers = owned_layers(decoder)
        for idx, _layer in layers:
            mask_function(layer_type_of(config, idx))
        # Hybrid decoders mix layer classes: each one is called the same way, so each is checked.
        for layer_cls in dict.fromkeys(type(layer) for _, layer in layers):
            require_parameters(layer_cls.forward, _LAYER_PARAMS, qualified_name(layer_cls.forward))
            layer_cache_parameter(layer_cls)

    return check


def _bind(fn, module: nn.Module, name: str):
    method = types.MethodType(fn, module)

    def forward(*args: Any, **kwargs: Any):
        return method(*args, **kwargs)

    mark(forward, f"am_pipelining.{name}")
    forward.__wrapped__ = fn  # type: ignore[attr-defined]
    forward.mask_cache = getattr(fn, "mask_cache", None)  # type: ignore[attr-defined]
    return forward


def _forward_patch(module: nn.Module, fn, name: str, contract=None) -> Patch:
    return Patch(module, "forward", _bind(fn, module, name), contract=contract)


def patch_hf_model_for_pp(
    model: nn.Module, patch_inner_model: bool = True, patch_causal_lm_model: bool = True
) -> PatchSet:
    """Patch a HF model (instances only) so that every stage's forward takes and returns tensors.

    Flavours: Gemma4 VLM (text backbone + VLM wrapper), Mistral3 VLM (generic backbone + Mistral3
    wrapper), causal LMs with `model.model` (backbone + generic causal-LM wrapper), else the module
    itself as a bare decoder. Callers skip this when `model_keeps_self_forward(model)`.
    Returns the applied PatchSet; undo with `.revert()` or `unpatch_hf_model_for_pp(model)`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"patch_hf_model_for_pp expects a torch.nn.Module, got {type(model).__name__}")
    existing = _ACTIVE.get(model)
    if existing is not None and existing.applied:
        return existing
    decoder = get_decoder(model)
    contract = _decoder_contract(decoder)
    patches = PatchSet(name="am_pipelining.patch_hf_model_for_pp")
    if is_gemma4_vlm(model) or (model_type(model) == "gemma4" and decoder is not model):
        inner_fn = create_pipeline_forward_gemma4_text()
        outer_fn = (
            create_pipeline_forward_gemma4_vlm()
            if is_gemma4_vlm(model)
            else create_pipeline_forward_causal_lm()
        )
    elif model_type(decoder) == "gemma4_text":
        inner_fn = create_pipeline_forward_gemma4_text()
        outer_fn = create_pipeline_forward_causal_lm()
    elif is_mistral3_vlm(model):
        inner_fn = create_pipeline_forward_inner(type(decoder).__name__)
        outer_fn = create_pipeline_forward_mistral3_vlm()
    else:
        inner_fn = create_pipeline_forward_inner(type(decoder).__name__)
        outer_fn = create_pipeline_forward_causal_lm()
    if patch_inner_model:
        patches.add(_forward_patch(decoder, inner_fn, "pipeline_forward_inner", contract))
    if patch_causal_lm_model and decoder is not model:
        patches.add(_forward_patch(model, outer_fn, "pipeline_forward_outer", contract))
    if not patches.patches:
        raise ValueError("patch_hf_model_for_pp: both patch_inner_model and patch_causal_lm_model are False")
    patches.apply()
    _ACTIVE[model] = patches
    return patches


def unpatch_hf_model_for_pp(model: nn.Module) -> None:
    """Undo patch_hf_model_for_pp(model): restore the original forwards (no-op if not patched)."""
    patches = _ACTIVE.pop(model, None)
    if patches is not None:
        patches.revert()


def pp_mask_cache(model: nn.Module):
    """The causal-mask cache of a patched model's decoder forward (None when not patched)."""
    forward = vars(get_decoder(model)).get("forward")
    return getattr(forward, "mask_cache", None)
