"""Stage plans (pure data) and the cutter that turns one HF model into pipeline stage modules.

As in torchtitan, the plan comes first and alone decides ownership: `plan_stages` reads the model
(meta models too) and returns one `StagePlan` per stage, naming every module the stage keeps and
every module it drops; `get_stage_plan` lists the kept names. The cutter (`cut_stage`, and
`split_model_into_stages` per stage) only carries a plan out: it skips copying the dropped modules,
rebuilds `layers` from the plan's layer indices and sets every other dropped module to None.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

from ._args import require_bool, require_int, require_module
from ._copy_safety import check_bindings, check_patches_before_copy
from .introspect import MULTIMODAL_SUFFIXES, get_decoder, owned_layers
from .output_path import STAGE0_DECODER_EXTRAS, final_module_names, input_embedding_name
from .patch import patch_hf_model_for_pp
from .validate import validate_hf_model_for_pipeline_support


def _costs(layer_costs: Sequence[float]) -> list[float]:
    if isinstance(layer_costs, (str, bytes)) or not isinstance(layer_costs, Sequence):
        raise TypeError(f"split_layer_ranges: layer_costs must be a sequence of numbers, got {layer_costs!r}")
    costs = []
    for i, c in enumerate(layer_costs):
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 <= c < float("inf"):
            raise ValueError(f"split_layer_ranges: layer_costs[{i}] must be a finite number >= 0, got {c!r}")
        costs.append(float(c))
    return costs


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
    num_stages = require_int(num_stages, "split_layer_ranges", "num_stages", minimum=1)
    costs = _costs(layer_costs)
    n = len(costs)
    if num_stages > n:
        raise ValueError(
            f"num_stages={num_stages} exceeds the number of layers (len(layer_costs)={n}); every stage "
            "needs a layer"
        )
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

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


def plan_layer_ranges(model: nn.Module, num_stages: int) -> list[range]:
    """Layer index ranges per stage, balancing parameter counts with the lm_head counted on the last stage."""
    require_module(model, "plan_layer_ranges")
    costs = [
        float(sum(p.numel() for p in layer.parameters())) for _, layer in owned_layers(get_decoder(model))
    ]
    head = getattr(model, "lm_head", None)
    head_cost = float(sum(p.numel() for p in head.parameters())) if isinstance(head, nn.Module) else 0.0
    return split_layer_ranges(costs, num_stages, last_stage_extra=head_cost)


@dataclass(frozen=True)
class StagePlan:
    """What stage `index` of `num_stages` owns, as dotted module paths from the model.

    `layers`: original indices of the decoder layers it runs. `owned`: every module it keeps, in
    order (input side, layers, rotary, output side). `dropped`: every module it removes (other
    stages' layers, then the input/output modules and multimodal towers it does not own).
    """

    index: int
    num_stages: int
    decoder: str
    layers: tuple[int, ...]
    owned: tuple[str, ...]
    dropped: tuple[str, ...]

    @property
    def layer_prefix(self) -> str:
        return _join(self.decoder, "layers")


def _prefix(model: nn.Module, module: nn.Module) -> str:
    for name, sub in model.named_modules():
        if sub is module:
            return name
    raise ValueError(f"{type(module).__name__} is not a submodule of {type(model).__name__}")


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _present(owner: nn.Module, prefix: str, names: Sequence[str]) -> list[str]:
    return [_join(prefix, n) for n in names if isinstance(getattr(owner, n, None), nn.Module)]


def _ranges(model: nn.Module, num_stages: int, layers_per_stage: Sequence[int] | None) -> list[range]:
    if layers_per_stage is None:
        return plan_layer_ranges(model, num_stages)
    if isinstance(layers_per_stage, (str, bytes)) or not isinstance(layers_per_stage, Sequence):
        raise TypeError(f"layers_per_stage must be a sequence of ints, got {layers_per_stage!r}")
    counts = [
        require_int(c, "get_stage_plan", f"layers_per_stage[{i}]") for i, c in enumerate(layers_per_stage)
    ]
    n_layers = len(owned_layers(get_decoder(model)))
    if len(counts) != num_stages or any(c < 1 for c in counts) or sum(counts) != n_layers:
        raise ValueError(
            f"layers_per_stage={counts} must have {num_stages} positive entries summing to {n_layers} layers"
        )
    starts = [sum(counts[:k]) for k in range(num_stages)]
    return [range(a, a + c) for a, c in zip(starts, counts)]


def plan_stages(
    model: nn.Module,
    num_stages: int,
    *,
    layers_per_stage: Sequence[int] | None = None,
    ranges: Sequence[range] | None = None,
) -> list[StagePlan]:
    """One StagePlan per stage. Pure: reads only (meta models too).

    Layers come from `ranges`, else `layers_per_stage`, else a parameter-balanced split. Stage 0 owns
    the input embedding (and Gemma4's per-layer-input modules) and the multimodal towers, the last
    stage the final modules (the norm) and lm_head; rotary embeddings hold no weights and are kept by every stage.
    """
    require_module(model, "plan_stages")
    num_stages = require_int(num_stages, "plan_stages", "num_stages", minimum=1)
    decoder = get_decoder(model)
    if ranges is None:
        ranges = _ranges(model, num_stages, layers_per_stage)
    elif len(ranges) != num_stages:
        raise ValueError(f"ranges has {len(ranges)} entries for num_stages={num_stages}")
    dec = _prefix(model, decoder)
    embed_name = input_embedding_name(decoder)
    inner = getattr(model, "model", None)
    towers = (
        _present(inner, _prefix(model, inner), MULTIMODAL_SUFFIXES)
        if isinstance(inner, nn.Module) and inner is not decoder
        else []
    )
    first = _present(decoder, dec, (embed_name, *STAGE0_DECODER_EXTRAS)) + towers
    last = _present(decoder, dec, final_module_names(decoder)) + _present(model, "", ("lm_head",))
    rotary = _present(decoder, dec, ("rotary_emb",))
    all_layers = [i for i, _ in owned_layers(decoder)]
    plans = []
    for s, rng in enumerate(ranges):
        keep = set(rng)
        layer_names = [_join(dec, "layers", str(i)) for i in all_layers if i in keep]
        other_layers = [_join(dec, "layers", str(i)) for i in all_layers if i not in keep]
        owned = (first if s == 0 else []) + layer_names + rotary + (last if s == num_stages - 1 else [])
        dropped = other_layers + ([] if s == 0 else first) + ([] if s == num_stages - 1 else last)
        layers = tuple(i for i in all_layers if i in keep)
        plans.append(StagePlan(s, num_stages, dec, layers, tuple(owned), tuple(dropped)))
    return plans


def get_stage_plan(
    model: nn.Module, num_stages: int, *, layers_per_stage: Sequence[int] | None = None
) -> list[list[str]]:
    """Module names (dotted paths from `model`) that each of `num_stages` stages owns. Pure: reads only.

    Stage 0 owns the input embedding and multimodal towers, the last stage the final modules and
    lm_head; rotary embeddings hold no weights and appear in every stage. Works on meta models.
    """
    return [list(plan.owned) for plan in plan_stages(model, num_stages, layers_per_stage=layers_per_stage)]


def _carry_out(model: nn.Module, plan: StagePlan) -> nn.Module:
    """Remove in place what `plan` drops: layers absent from `layers`, other modules set to None."""
    decoder = model.get_submodule(plan.decoder)
    keep = set(plan.layers)
    # A ModuleDict keyed by the original index keeps parameter names equal to the unsplit model's.
    decoder.layers = nn.ModuleDict({str(i): layer for i, layer in owned_layers(decoder) if i in keep})
    for name in plan.dropped:
        if name.startswith(plan.layer_prefix + "."):
            continue
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, None)
    return model


def _check_stage_index(stage_index: int, num_stages: int, function: str) -> int:
    stage_index = require_int(stage_index, function, "stage_index")
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"{function}: stage_index must be in [0, {num_stages}), got {stage_index}")
    return stage_index


def cut_stage(
    model: nn.Module, num_stages: int, stage_index: int, ranges: Sequence[range] | None = None
) -> nn.Module:
    """Delete in place what stage `stage_index` does not own (layers absent; embed/norm/lm_head None).

    Raises ValueError when an instance-level patched method of `model` is bound to, or closes over,
    a module outside `model` (a patch applied before `model` was deep-copied from another one).
    """
    require_module(model, "cut_stage")
    num_stages = require_int(num_stages, "cut_stage", "num_stages", minimum=1)
    stage_index = _check_stage_index(stage_index, num_stages, "cut_stage")
    plan = plan_stages(model, num_stages, ranges=ranges)[stage_index]
    check_bindings(model, None, f"the model cut to stage {stage_index}")
    return _carry_out(model, plan)


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

    Instance-level patches on `model` must survive the copy: a patched forward that closes over a
    module (rather than being bound with types.MethodType) would still run the original model's
    weights, so this raises ValueError naming it; apply such patches (e.g. Liger) after splitting.
    """
    require_module(model, "split_model_into_stages")
    require_bool(patch_forwards, "split_model_into_stages", "patch_forwards")
    validate_hf_model_for_pipeline_support(model, num_stages=num_stages)
    if stage_index is not None:
        stage_index = _check_stage_index(stage_index, num_stages, "split_model_into_stages")
    plans = plan_stages(model, num_stages, layers_per_stage=layers_per_stage)
    chosen = plans if stage_index is None else [plans[stage_index]]
    original = {id(m): name for name, m in model.named_modules()}
    stages = []
    for plan in chosen:
        dropped = [model.get_submodule(name) for name in plan.dropped]
        check_patches_before_copy(model, {id(sub) for m in dropped for sub in m.modules()}, plan.index)
        # Seeding deepcopy's memo with None for dropped modules skips copying their weights.
        copied = copy.deepcopy(model, {id(m): None for m in dropped})
        check_bindings(copied, original, f"stage {plan.index}")
        stage = _carry_out(copied, plan)
        if patch_forwards:
            patch_hf_model_for_pp(stage)
        stages.append(stage)
    return stages if stage_index is None else stages[0]
