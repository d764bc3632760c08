"""Pipeline-parallel compatibility: a non-raising list of problems and the raising validate."""

from __future__ import annotations

from torch import nn

from ._args import require_int, require_module
from .introspect import get_decoder, get_text_config, is_vlm, model_type
from .mask_cache import _MASK_FUNCTIONS
from .patch import DecoderContract, _forwards_for, _handle_of
from .probe import probe_stage_path
from .run_layers import stage_layer_types


def _tied(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if head is None or not callable(get_in):
        return False
    try:
        embed = get_in()
    except (AttributeError, NotImplementedError):
        return False
    return embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", object())


def _contract_holds(decoder: nn.Module) -> bool:
    """Whether the transformers pieces the stage forwards call still match (see patch.DecoderContract)."""
    try:
        DecoderContract(decoder)(None)
    except RuntimeError:  # contract drift is not a model problem: patching raises it, naming the version
        return False
    return True


def get_pipeline_problems(model: nn.Module, *, num_stages: int | None = None) -> list[str]:
    """Everything that stops `model` from being pipelined (empty list = compatible).

    Never raises for a model: what is wrong with it is a problem in the list. A `num_stages` that is
    not an int (or None) raises TypeError naming it. When the structural checks pass and the weights
    are materialised (not meta) and not yet patched, a probe (probe.py) runs a short token sequence
    through the unsplit forward and through the stage path and lists any disagreement.
    """
    if num_stages is not None:
        num_stages = require_int(num_stages, "get_pipeline_problems", "num_stages")
    if not isinstance(model, nn.Module):
        return [f"model must be a torch.nn.Module, got {type(model).__name__}"]
    problems: list[str] = []
    config = getattr(model, "config", None)
    if config is None:
        return [
            f"model ({type(model).__name__}) has no `config`; pipeline support needs a Hugging Face "
            "PreTrainedModel"
        ]
    text_config = get_text_config(model)

    # transformers ties by the top-level config's flag; for VLMs that flag lives on model.config,
    # not on text_config, so say exactly which config to change.
    top_flag = getattr(config, "tie_word_embeddings", False)
    if top_flag or _tied(model):
        where = (
            "model.config" if not is_vlm(model) else f"the top-level model.config ({type(config).__name__})"
        )
        extra = " (setting it on text_config alone is not enough)" if text_config is not config else ""
        problems.append(
            f"word embeddings are tied (tie_word_embeddings={top_flag!r} on {where}); the first stage owns "
            f"embed_tokens and the last owns lm_head, so they cannot share a weight: load the model with "
            f"tie_word_embeddings=False on {where}{extra}"
        )
    if getattr(text_config, "use_bidirectional_attention", None):
        problems.append(
            f"use_bidirectional_attention={text_config.use_bidirectional_attention!r} is not supported by "
            "the pipeline forwards (causal masks only); set it to False/None"
        )
    try:
        decoder = get_decoder(model)
    except ValueError as exc:
        problems.append(str(exc))
        return problems
    n_layers = len(decoder.layers)
    try:
        layer_types = set(stage_layer_types(decoder).values())
    except ValueError as exc:  # the config's layer types disagree with what the layers were built as
        problems.append(str(exc))
        layer_types = set()
    bad_types = sorted(layer_types - set(_MASK_FUNCTIONS), key=str)
    if bad_types:
        problems.append(
            f"layer types {bad_types} have no causal-mask builder in the pipeline forwards "
            f"(supported: {sorted(_MASK_FUNCTIONS)})"
        )
    if num_stages is not None:
        if num_stages < 1:
            problems.append(f"num_stages must be >= 1, got {num_stages}")
        elif num_stages > n_layers:
            problems.append(
                f"num_stages={num_stages} exceeds the {n_layers} decoder layers; use at most {n_layers}"
            )
        if model_type(decoder) == "gemma4_text" and num_stages > 1:
            if getattr(decoder.config, "hidden_size_per_layer_input", 0):
                problems.append(
                    "Gemma4 per-layer inputs (hidden_size_per_layer_input="
                    f"{decoder.config.hidden_size_per_layer_input}) are computed from token ids on stage 0 only; "
                    "use hidden_size_per_layer_input=0 to pipeline this model"
                )
            if getattr(decoder.config, "num_kv_shared_layers", 0):
                problems.append(
                    f"Gemma4 KV sharing (num_kv_shared_layers={decoder.config.num_kv_shared_layers}) crosses "
                    "stage boundaries; use num_kv_shared_layers=0 to pipeline this model"
                )
    if not problems and _handle_of(model) is None and _contract_holds(decoder):
        found = probe_stage_path(model, _forwards_for(model, decoder)[0])
        if found is not None:
            problems.append(found)
    return problems


def validate_hf_model_for_pipeline_support(model: nn.Module, *, num_stages: int | None = None) -> None:
    """Raise ValueError listing what to change when `model` cannot be pipelined."""
    require_module(model, "validate_hf_model_for_pipeline_support")
    problems = get_pipeline_problems(model, num_stages=num_stages)
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise ValueError(f"{type(model).__name__} is not compatible with pipeline parallelism:\n{lines}")
