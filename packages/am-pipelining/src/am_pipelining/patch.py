"""patch_hf_model_for_pp: swap in pipeline-compatible forwards on one model's instances (reversible).

Nothing global is kept: the applied PatchSet travels on the installed forwards themselves
(`BoundPipelineForward.handle`), so a model dropped without undo is freed, and a deep copy or an
unpickled copy of a patched model carries its own handle, bound to its own modules.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ._args import require_bool, require_module
from ._contract import contract_error, qualified_name, require_parameters
from ._patch import Patch, PatchSet
from .forwards import (
    create_pipeline_forward_causal_lm,
    create_pipeline_forward_gemma4_text,
    create_pipeline_forward_gemma4_vlm,
    create_pipeline_forward_inner,
    create_pipeline_forward_mistral3_vlm,
)
from .introspect import get_decoder, is_gemma4_vlm, is_mistral3_vlm, model_type, owned_layers
from .mask_cache import CausalMaskCache, mask_function
from .run_layers import layer_cache_parameter, stage_layer_types
from .stage_forward import BoundPipelineForward, PipelineForward

_LAYER_PARAMS = ("attention_mask", "position_embeddings", "position_ids")


class DecoderContract:
    """The transformers pieces a pipeline forward calls, checked before anything is patched.

    A module-level callable (not a closure over the decoder), so the patch handle deep-copies and
    pickles together with the model.
    """

    def __init__(self, decoder: nn.Module) -> None:
        self.decoder = decoder

    def __call__(self, _live: Any) -> None:
        decoder = self.decoder
        if not hasattr(decoder, "layers"):
            raise contract_error(f"{type(decoder).__qualname__}", "has no `layers` attribute")
        for layer_type in set(stage_layer_types(decoder).values()):
            mask_function(layer_type)
        # Hybrid decoders mix layer classes: each one is called the same way, so each is checked.
        for layer_cls in dict.fromkeys(type(layer) for _, layer in owned_layers(decoder)):
            require_parameters(layer_cls.forward, _LAYER_PARAMS, qualified_name(layer_cls.forward))
            layer_cache_parameter(layer_cls)


def _forwards_for(model: nn.Module, decoder: nn.Module) -> tuple[PipelineForward, PipelineForward]:
    """(decoder forward, wrapper forward) for the model's flavour."""
    if is_gemma4_vlm(model):
        return create_pipeline_forward_gemma4_text(), create_pipeline_forward_gemma4_vlm()
    if model_type(decoder) == "gemma4_text" or (model_type(model) == "gemma4" and decoder is not model):
        return create_pipeline_forward_gemma4_text(), create_pipeline_forward_causal_lm()
    inner = create_pipeline_forward_inner(type(decoder).__name__)
    if is_mistral3_vlm(model):
        return inner, create_pipeline_forward_mistral3_vlm()
    return inner, create_pipeline_forward_causal_lm()


def _handle_of(model: nn.Module) -> PatchSet | None:
    """The PatchSet of our forwards installed on `model` (or on its decoder), if any."""
    modules = [model]
    try:
        modules.append(get_decoder(model))
    except ValueError:  # no decoder: nothing of ours can be installed below the model
        pass
    for module in modules:
        own = vars(module).get("forward")
        if isinstance(own, BoundPipelineForward) and own.__self__ is module and own.handle is not None:
            return own.handle
    return None


def patch_hf_model_for_pp(
    model: nn.Module, patch_inner_model: bool = True, patch_causal_lm_model: bool = True
) -> PatchSet:
    """Patch a HF model (instances only) so that every stage's forward takes and returns tensors.

    Flavours: Gemma4 VLM (text backbone + VLM wrapper), Mistral3 VLM (generic backbone + Mistral3
    wrapper), causal LMs with `model.model` (backbone + generic causal-LM wrapper), else the module
    itself as a bare decoder. Callers skip this when `model_keeps_self_forward(model)`.
    Returns the applied PatchSet; undo with `.revert()` or `unpatch_hf_model_for_pp(model)`.
    The installed forwards are deep-copied and pickled with the model, bound to the copy.
    """
    require_module(model, "patch_hf_model_for_pp")
    require_bool(patch_inner_model, "patch_hf_model_for_pp", "patch_inner_model")
    require_bool(patch_causal_lm_model, "patch_hf_model_for_pp", "patch_causal_lm_model")
    existing = _handle_of(model)
    if existing is not None and existing.applied:
        return existing
    decoder = get_decoder(model)
    inner_fn, outer_fn = _forwards_for(model, decoder)
    contract = DecoderContract(decoder)
    handle = PatchSet(name="am_pipelining.patch_hf_model_for_pp")
    wanted = (
        (decoder, inner_fn, "pipeline_forward_inner", patch_inner_model),
        (model, outer_fn, "pipeline_forward_outer", patch_causal_lm_model and decoder is not model),
    )
    for module, fn, name, on in wanted:
        if on:
            bound = BoundPipelineForward(fn, module, f"am_pipelining.{name}")
            bound.handle = handle
            handle.add(Patch(module, "forward", bound, contract=contract))
    if not handle.patches:
        raise ValueError("patch_hf_model_for_pp: both patch_inner_model and patch_causal_lm_model are False")
    return handle.apply()


def unpatch_hf_model_for_pp(model: nn.Module) -> None:
    """Undo patch_hf_model_for_pp(model): restore the original forwards (no-op if not patched).

    Raises RuntimeError, changing nothing, when another patch was stacked on one of ours.
    """
    require_module(model, "unpatch_hf_model_for_pp")
    handle = _handle_of(model)
    if handle is not None:
        handle.revert()


def pp_mask_cache(model: nn.Module) -> CausalMaskCache | None:
    """The causal-mask cache of a patched model's decoder forward (None when not patched)."""
    require_module(model, "pp_mask_cache")
    forward = vars(get_decoder(model)).get("forward")
    return forward.mask_cache if isinstance(forward, BoundPipelineForward) else None
