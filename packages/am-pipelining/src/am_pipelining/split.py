"""Stage plans (pure) and the cutter that turns one HF model into pipeline stage modules."""

from __future__ import annotations

import copy
import functools
import types
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .introspect import MULTIMODAL_SUFFIXES, get_decoder, owned_layers
from .patch import patch_hf_model_for_pp
from .validate import validate_hf_model_for_pipeline_support

_PATCH_MARKER = "__am_patch__"
_BINDING_FIX = (
    "apply per-instance patches (e.g. Liger) after splitting, or use patches that bind with "
    "types.MethodType (copy.deepcopy rebinds those to the copied module)"
)
# Deep enough for a wrapper closing over a bound method closing over a module; cycles are cut by `seen`.
_MAX_REFERENCE_DEPTH = 6

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


def _modules_reached(value: Any, seen: set[int], depth: int = 0) -> Iterator[nn.Module]:
    """Every module `value` reaches through closure cells, bound `__self__`, partial arguments, containers."""
    if depth > _MAX_REFERENCE_DEPTH or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, nn.Module):
        yield value
        return
    children: list[Any] = []
    if isinstance(value, types.MethodType):
        children = [value.__self__, value.__func__]
    elif isinstance(value, functools.partial):
        children = [value.func, *value.args, *value.keywords.values()]
    elif isinstance(value, types.FunctionType):
        for cell in value.__closure__ or ():
            try:
                children.append(cell.cell_contents)
            except ValueError:  # an empty cell (a variable not yet assigned) holds nothing
                continue
    elif isinstance(value, (tuple, list, set, frozenset)):
        children = list(value)
    elif isinstance(value, dict):
        children = list(value.values())
    for child in children:
        yield from _modules_reached(child, seen, depth + 1)


def _modules_kept_by_closures(value: Any) -> Iterator[nn.Module]:
    """Modules a callable reaches that `copy.deepcopy` will NOT rebind to the copy.

    deepcopy rebinds a bound method's `__self__` and a partial's arguments, but copies functions
    by reference: whatever their closure cells hold stays the original object.
    """
    if isinstance(value, types.MethodType):
        value = value.__func__
    elif isinstance(value, functools.partial):
        value = value.func
    if not isinstance(value, types.FunctionType):
        return
    seen = {id(value)}
    for cell in value.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell holds nothing
            continue
        yield from _modules_reached(content, seen, 1)


def _copied_methods(value: Any, path: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(path, bound method) for every bound method that deep-copying `value` would rebind.

    Follows what deepcopy copies (containers, partial arguments, plain objects' attributes) and
    stops at modules and tensors (the module tree is walked separately) and at functions (copied
    by reference, closures included).
    """
    if depth > _MAX_REFERENCE_DEPTH or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, types.MethodType):
        yield path, value
        return
    if isinstance(value, (nn.Module, torch.Tensor, types.FunctionType, type, str, bytes, int, float)):
        return
    if isinstance(value, functools.partial):
        items = [(f"{path}.args[{i}]", a) for i, a in enumerate(value.args)]
        items += [(f"{path}.keywords[{k!r}]", v) for k, v in value.keywords.items()]
    elif isinstance(value, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (tuple, list, set, frozenset)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        try:
            attrs = vars(value)
        except TypeError:  # no __dict__ (slots or a builtin): nothing of ours can hide in it
            return
        items = [(f"{path}.{k}", v) for k, v in attrs.items()]
    for item_path, item in items:
        yield from _copied_methods(item, item_path, seen, depth + 1)


def _callables(module: nn.Module) -> Iterator[tuple[str, Any]]:
    for attr, value in vars(module).items():
        if isinstance(value, (types.FunctionType, types.MethodType, functools.partial)):
            yield attr, value


def _describe_patch(path: str, attr: str, value: Any) -> str:
    marker = getattr(value, _PATCH_MARKER, None)
    where = _join(path, attr)
    return f"{where} (patch {marker!r})" if marker else where


def _check_patches_before_copy(model: nn.Module, skipped: set[int], stage: int) -> None:
    """Refuse our instance patches that deepcopy would leave pointing at `model`'s modules.

    Our replacements carry `__am_patch__`. A closure over a module is never rebound by deepcopy;
    a method bound to a module the stage drops would be rebound to None.
    """
    names = {id(m): name for name, m in model.named_modules()}
    seen: set[int] = set()
    for path, module in model.named_modules():
        if id(module) in skipped:
            continue
        for attr, value in vars(module).items():
            if attr in ("_modules", "_parameters", "_buffers"):
                continue
            # deepcopy would rebind these to a dropped module, i.e. to None (a TypeError deep in copy):
            # e.g. a patch handle kept on the model that references other stages' patched modules.
            for where, method in _copied_methods(value, _join(path, attr), seen):
                if id(method.__self__) in skipped:
                    marker = getattr(method, _PATCH_MARKER, None)
                    raise ValueError(
                        f"{where}{f' (patch {marker!r})' if marker else ''} is a method bound to "
                        f"{names.get(id(method.__self__), '?')}, which stage {stage} does not own, so the "
                        f"stage cannot be copied without it; apply per-instance patches (e.g. Liger) after "
                        f"splitting (a patch handle kept on the model references every patched module)"
                    )
            if getattr(value, _PATCH_MARKER, None) is None:
                continue
            for target in _modules_kept_by_closures(value):
                if id(target) in names:
                    raise ValueError(
                        f"{_describe_patch(path, attr, value)} closes over {names[id(target)] or '<model>'} "
                        f"({type(target).__name__}) of the model being split: a deep copy keeps that "
                        f"closure, so stage {stage} would run the original model's weights; {_BINDING_FIX}"
                    )


def _check_bindings(model: nn.Module, original: dict[int, str] | None, what: str) -> None:
    """Every bound method in a module's `__dict__` is bound to that module; nothing reaches `original`.

    With `original=None` (cut_stage on a caller's copy), references must stay inside `model`.
    """
    own = {id(m) for m in model.modules()}
    for path, module in model.named_modules():
        for attr, value in _callables(module):
            owner = getattr(value, "__self__", None) if isinstance(value, types.MethodType) else None
            if isinstance(owner, nn.Module) and owner is not module:
                place = (
                    f"the ORIGINAL model's {original[id(owner)] or '<model>'}"
                    if original is not None and id(owner) in original
                    else f"another module ({type(owner).__name__})"
                )
                raise ValueError(
                    f"{_describe_patch(path, attr, value)} of {what} is bound to {place}, not to "
                    f"{path or '<model>'} itself; {_BINDING_FIX}"
                )
            for target in _modules_reached(value, set()):
                if original is not None and id(target) in original:
                    raise ValueError(
                        f"{_describe_patch(path, attr, value)} of {what} still reaches the ORIGINAL "
                        f"model's {original[id(target)] or '<model>'} ({type(target).__name__}) after the "
                        f"deep copy, so it would run the original weights; {_BINDING_FIX}"
                    )
                if original is None and id(target) not in own:
                    raise ValueError(
                        f"{_describe_patch(path, attr, value)} of {what} reaches a "
                        f"{type(target).__name__} outside it (e.g. in the model it was copied from), so it "
                        f"would run that module's weights; {_BINDING_FIX}"
                    )


def cut_stage(
    model: nn.Module, num_stages: int, stage_index: int, ranges: Sequence[range] | None = None
) -> nn.Module:
    """Delete in place what stage `stage_index` does not own (layers absent; embed/norm/lm_head None).

    Raises ValueError when an instance-level patched method of `model` is bound to, or closes over,
    a module outside `model` (a patch applied before `model` was deep-copied from another one).
    """
    if not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index must be in [0, {num_stages}), got {stage_index}")
    _check_bindings(model, None, f"the model cut to stage {stage_index}")
    return _cut(model, num_stages, stage_index, ranges)


def _cut(
    model: nn.Module, num_stages: int, stage_index: int, ranges: Sequence[range] | None = None
) -> nn.Module:
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

    Instance-level patches on `model` must survive the copy: a patched forward that closes over a
    module (rather than being bound with types.MethodType) would still run the original model's
    weights, so this raises ValueError naming it; apply such patches (e.g. Liger) after splitting.
    """
    validate_hf_model_for_pipeline_support(model, num_stages=num_stages)
    ranges = _ranges(model, num_stages, layers_per_stage)
    if stage_index is not None and not 0 <= stage_index < num_stages:
        raise ValueError(f"stage_index must be in [0, {num_stages}), got {stage_index}")
    indices = range(num_stages) if stage_index is None else [stage_index]
    original = {id(m): name for name, m in model.named_modules()}
    stages = []
    for s in indices:
        unowned = _unowned_modules(model, num_stages, s, ranges)
        skipped = {id(sub) for m in unowned for sub in m.modules()}
        _check_patches_before_copy(model, skipped, s)
        # Seeding deepcopy's memo with None for unowned modules skips copying their weights.
        memo = {id(m): None for m in unowned}
        copied = copy.deepcopy(model, memo)
        _check_bindings(copied, original, f"stage {s}")
        stage = _cut(copied, num_stages, s, ranges)
        if patch_forwards:
            patch_hf_model_for_pp(stage)
        stages.append(stage)
    return stages if stage_index is None else stages[0]
