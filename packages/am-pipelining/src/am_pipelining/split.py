"""Stage plans (pure) and the cutter that turns one HF model into pipeline stage modules."""

from __future__ import annotations

import copy
from collections.abc import Sequence

from torch import nn

from .introspect import MULTIMODAL_SUFFIXES, get_decoder, owned_layers
from .patch import patch_hf_model_for_pp
from .validate import validate_hf_model_for_pipeline_support

# Gemma4's per-layer-input embedding lives next to embed_tokens and belongs to stage 0.
_STAGE0_DECODER_EXTRAS = ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")


def split_layer_ranges(
    layer_costs: Sequence[float],
    num_stages: int,
    *,
    last_stage_extra: float = 0.0,
    first_stage_extra: float = 0.0,
) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the costliest stage (every stage gets >= 1 layer).

    `last_stage_extra`/`first_stage_extra` add the cost of what the last/first stage also runs
    (the lm_head, the embedding). Ties prefer putting layers on earlier stages.
    """
    n = len(layer_costs)
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if num_stages > n:
        raise ValueError(
            f"num_stages={num_stages} exceeds the number of layers ({n}); every stage needs a layer"
        )
    prefix = [0.0]
    for c in layer_costs:
        prefix.append(prefix[-1] + float(c))

    def cost(i: int, j: int, stage: int) -> float:
        extra = (first_stage_extra if stage == 0 else 0.0) + (
            last_stage_extra if stage == num_stages - 1 else 0.0
        )
        return prefix[j] - prefix[i] + extra

    inf = float("inf")
    # best[s][j]: minimal max-cost of putting layers [0, j) on stages [0, s].
    best = [[inf] * (n + 1) for _ in range(num_stages)]
    cut = [[0] * (n + 1) for _ in range(num_stages)]
    for j in range(1, n + 1):
        best[0][j] = cost(0, j, 0)
    for s in range(1, num_stages):
        for j in range(s + 1, n + 1):
            for i in range(j - 1, s - 1, -1):
                value = max(best[s - 1][i], cost(i, j, s))
                if value < best[s][j] - 1e-9:
                    best[s][j] = value
                    cut[s][j] = i
    bounds = [n]
    j = n
    for s in range(num_stages - 1, 0, -1):
        j = cut[s][j]
        bounds.append(j)
    bounds.append(0)
    bounds.reverse()
    return [range(bounds[k], bounds[k + 1]) for k in range(num_stages)]


def _prefix(model: nn.Module, module: nn.Module) -> str:
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _io_names(decoder: nn.Module) -> tuple[str, str]:
    """(input embedding, final norm) attribute names, from `base_model_pp_plan` where the config has one."""
    plan = getattr(decoder.config, "base_model_pp_plan", None)
    if plan:
        keys = list(plan)
        if len(keys) >= 3 and keys[1] == "layers":
            return keys[0], keys[-1]
    return "embed_tokens", "norm"


def _multimodal_owner(model: nn.Module, decoder: nn.Module) -> nn.Module | None:
    inner = getattr(model, "model", None)
    return inner if isinstance(inner, nn.Module) and inner is not decoder else None


def _layer_costs(decoder: nn.Module) -> tuple[list[float], float]:
    layers = owned_layers(decoder)
    costs = [float(sum(p.numel() for p in layer.parameters())) for _, layer in layers]
    return costs, 0.0


def plan_layer_ranges(model: nn.Module, num_stages: int) -> list[range]:
    """Layer index ranges per stage, balancing parameter counts with the lm_head counted on the last stage."""
    decoder = get_decoder(model)
    costs, _ = _layer_costs(decoder)
    head = getattr(model, "lm_head", None)
    head_cost = float(sum(p.numel() for p in head.parameters())) if isinstance(head, nn.Module) else 0.0
    return split_layer_ranges(costs, num_stages, last_stage_extra=head_cost)


def get_stage_plan(
    model: nn.Module, num_stages: int, *, layers_per_stage: Sequence[int] | None = None
) -> list[list[str]]:
    """Module names (dotted paths from `model`) that each of `num_stages` stages owns. Pure: reads only.

    Stage 0 owns the input embedding and multimodal towers, the last stage the final norm and
    lm_head; rotary embeddings hold no weights and appear in every stage. Works on meta models.
    """
    decoder = get_decoder(model)
    ranges = _ranges(model, num_stages, layers_per_stage)
    dec = _prefix(model, decoder)
    embed_name, norm_name = _io_names(decoder)
    owner = _multimodal_owner(model, decoder)
    plan: list[list[str]] = []
    for s, rng in enumerate(ranges):
        names: list[str] = []
        if s == 0:
            if getattr(decoder, embed_name, None) is not None:
                names.append(_join(dec, embed_name))
            names += [_join(dec, n) for n in _STAGE0_DECODER_EXTRAS if getattr(decoder, n, None) is not None]
            if owner is not None:
                own = _prefix(model, owner)
                names += [
                    _join(own, n)
                    for n in MULTIMODAL_SUFFIXES
                    if isinstance(getattr(owner, n, None), nn.Module)
                ]
        names += [_join(dec, "layers", str(i)) for i in rng]
        if getattr(decoder, "rotary_emb", None) is not None:
            names.append(_join(dec, "rotary_emb"))
        if s == num_stages - 1:
            if getattr(decoder, norm_name, None) is not None:
                names.append(_join(dec, norm_name))
            if isinstance(getattr(model, "lm_head", None), nn.Module):
                names.append("lm_head")
        plan.append(names)
    return plan


def _ranges(model: nn.Module, num_stages: int, layers_per_stage: Sequence[int] | None) -> list[range]:
    if layers_per_stage is None:
        return plan_layer_ranges(model, num_stages)
    counts = list(layers_per_stage)
    n_layers = len(owned_layers(get_decoder(model)))
    if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != n_layers:
        raise ValueError(
            f"layers_per_stage={counts} must have {num_stages} positive entries summing to {n_layers} layers"
        )
    starts = [sum(counts[:k]) for k in range(num_stages)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


def _unowned_modules(model: nn.Module, num_stages: int, stage_index: int, ranges: Sequence[range]) -> list:
    decoder = get_decoder(model)
    keep = set(ranges[stage_index])
    out = [layer for i, layer in owned_layers(decoder) if i not in keep]
    embed_name, norm_name = _io_names(decoder)
    if stage_index != 0:
        out += [getattr(decoder, n, None) for n in (embed_name, *_STAGE0_DECODER_EXTRAS)]
        owner = _multimodal_owner(model, decoder)
        if owner is not None:
            out += [getattr(owner, n, None) for n in MULTIMODAL_SUFFIXES]
    if stage_index != num_stages - 1:
        out += [getattr(decoder, norm_name, None), getattr(model, "lm_head", None)]
    return [m for m in out if isinstance(m, nn.Module)]


def cut_stage(
    model: nn.Module, num_stages: int, stage_index: int, ranges: Sequence[range] | None = None
) -> nn.Module:
    """Delete in place what stage `stage_index` does not own (layers absent; embed/norm/lm_head None)."""
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index must be in [0, {num_stages}), got {stage_index}")
    decoder = get_decoder(model)
    ranges = list(ranges) if ranges is not None else plan_layer_ranges(model, num_stages)
    keep = set(ranges[stage_index])
    # A ModuleDict keyed by the original index keeps parameter names equal to the unsplit model's.
    decoder.layers = nn.ModuleDict({str(i): layer for i, layer in owned_layers(decoder) if i in keep})
    embed_name, norm_name = _io_names(decoder)
    if stage_index != 0:
        setattr(decoder, embed_name, None)
        for n in _STAGE0_DECODER_EXTRAS:
            if getattr(decoder, n, None) is not None:
                setattr(decoder, n, None)
        owner = _multimodal_owner(model, decoder)
        if owner is not None:
            for n in MULTIMODAL_SUFFIXES:
                if isinstance(getattr(owner, n, None), nn.Module):
                    setattr(owner, n, None)
    if stage_index != num_stages - 1:
        setattr(decoder, norm_name, None)
        if isinstance(getattr(model, "lm_head", None), nn.Module):
            model.lm_head = None
    return model


def split_model_into_stages(
    model: nn.Module,
    num_stages: int,
    *,
    stage_index: int | None = None,
    layers_per_stage: Sequence[int] | None = None,
    patch_forwards: bool = True,
) -> nn.Module | list[nn.Module]:
    """Cut a HF causal LM (or VLM text backbone) into `num_stages` stage modules.

    Returns every stage (a list) or only `stage_index`. Each stage is a deep copy of `model` with the
    modules it does not own removed and, with `patch_forwards`, pipeline forwards patched in (the
    stage's forward takes token ids or hidden states and returns hidden states or logits). Parameter
    names stay those of the unsplit model. `model` itself is left untouched.
    """
    validate_hf_model_for_pipeline_support(model, num_stages=num_stages)
    ranges = _ranges(model, num_stages, layers_per_stage)
    indices = range(num_stages) if stage_index is None else [stage_index]
    stages = []
    for s in indices:
        # Seeding deepcopy's memo with None for unowned modules skips copying their weights.
        memo = {id(m): None for m in _unowned_modules(model, num_stages, s, ranges)}
        stage = cut_stage(copy.deepcopy(model, memo), num_stages, s, ranges)
        if patch_forwards:
            patch_hf_model_for_pp(stage)
        stages.append(stage)
    return stages if stage_index is None else stages[0]
