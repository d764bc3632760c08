"""Swap a HF model's `nn.Linear` modules for Transformer Engine `Linear` modules (FP8 GEMMs), and undo it.

`plan_te_linear(model)` says, per `nn.Linear`, whether it would be swapped and why not (pure).
`inject_te_linear(model)` builds one TE Linear per eligible module, gives it the original's *own* `weight`
(and `bias`) Parameter objects (so values, `requires_grad`, ties and optimizer state carry over, and training
the swapped model trains the original's tensors) and puts it where the original was. Each replacement is an
`ItemPatch` of the parent's `_modules` entry; each TE module also gets an instance `forward` that passes
`get_is_first_microbatch()` as `is_first_microbatch` when the caller passes none (the seed's gradient-
accumulation semantics: quantize and cache the FP8 weight on the first microbatch, reuse it on the others).
The handle is recorded on the model (`model._am_te_linear`), so a second inject returns it, a `deepcopy`
carries its own, and `remove_te_linear(model)` restores the exact original module objects.

Not swapped, each with its reason in the plan (the first that applies): subclasses of `nn.Linear` (LoRA,
quantized linears: their forward is not plain `F.linear`), names matched by `skip`, the output projection
(`get_output_embeddings()` or a `lm_head` segment) unless `include_lm_head=True`, linears whose weight is an
`nn.Embedding`'s weight (tied), modules kept in fp32 by `_keep_in_fp32_modules(_strict)` (every declared
keyword, exact-segment rule of `fp32_rules`), MoE routers/gates (a `router`, `gate` or `shared_expert_gate`
segment, or as many outputs as the config has experts next to an `experts` module), per-expert linears
under an `experts` module (the tokens routed to one expert are not a multiple of 16), DTensor (TP/FSDP-sharded)
weights, meta-device weights, modules with hooks, non-float16/bfloat16/float32 weights, `in_features`/
`out_features` that are not multiples of 16 (32 for mxfp8) and, for the real TE, weights not on CUDA.

`fuse=True` runs each group of eligible siblings in `FUSED_SIBLINGS` (one parent, same input width, dtype,
device and bias presence, not a cross-attention) as one TE Linear (`te_fused`): fewer TE calls per layer,
which is what bounds a ~1B model's FP8 step; `fuse=[names, ...]` fuses the groups given (each member's
output is copied out of the shared GEMM, so wide groups such as gate/up may cost more than they save).
The plan says which rows share a GEMM.
"""

from __future__ import annotations

import functools
import types
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ._args import check_bool, check_model
from ._contract import contract_error
from ._eager import run_eager
from ._patch import ItemPatch, Patch, PatchSet, mark, patch_name
from .fp8 import check_recipe
from .fp32_rules import get_fp32_module_keywords, has_dtensor_params, name_matches
from .microbatch import get_is_first_microbatch
from .te_fused import FusedGroup, FusedProjection, split_parameter_names
from .te_lazy import _require_first_microbatch_arg, load_te

__all__ = ["get_plain_state_dict", "inject_te_linear", "plan_te_linear", "remove_te_linear"]

RECORD_ATTR = "_am_te_linear"
FORWARD_MARK = "am_precision.te_linear_instance_forward"
ROUTER_SEGMENTS = ("router", "gate", "shared_expert_gate")
_EXPERT_COUNT_ATTRS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Sibling projections a layer calls on one input, in output order; `fuse=True` gives each group one GEMM.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
# Parents whose keys/values read another sequence than their queries: one GEMM there would run per member.
_CROSS_ATTENTION = ("crossattention", "crossattn", "encoderattn")  # matched with "_" removed
TE_DEVICE_TYPE = "cuda"  # where transformer_engine.pytorch.Linear runs (the default factory only)


class PlanRow(NamedTuple):
    name: str  # dotted module path
    taken: bool  # swapped (or would be)
    reason: str  # why not, or "in->out" when taken


def _flagged_forward(
    self: nn.Module, inp: torch.Tensor, is_first_microbatch: bool | None = None, *args, **kwargs
):
    # Looked up on the class at call time, so a class-level patch (patch_te_modules) still runs.
    if is_first_microbatch is None:
        is_first_microbatch = get_is_first_microbatch()
    return run_eager(type(self).forward, self, inp, is_first_microbatch, *args, **kwargs)


mark(_flagged_forward, FORWARD_MARK)


def is_swapped(module: nn.Module) -> bool:
    """The module was put in place by `inject_te_linear` (a TE Linear, or a member of a fused group)."""
    return isinstance(module, FusedProjection) or patch_name(vars(module).get("forward")) == FORWARD_MARK


def _check_skip(skip: object) -> tuple[str, ...]:
    if isinstance(skip, (str, bytes)) or not isinstance(skip, Iterable):
        raise TypeError(
            f"skip must be a list/tuple of dotted module names, got {type(skip).__name__} {skip!r:.80}"
        )
    names = tuple(skip)
    bad = [s for s in names if not isinstance(s, str) or not s or "" in s.split(".")]
    if bad:
        raise ValueError(
            f"skip has invalid entries {bad!r}; expected dotted module names like 'mlp.down_proj'"
        )
    return names


def _expert_counts(model: nn.Module) -> set[int]:
    counts: set[int] = set()
    for module in model.modules():
        config = vars(module).get("config")
        for cfg in (config, getattr(config, "text_config", None)):
            for attr in _EXPERT_COUNT_ATTRS:
                value = getattr(cfg, attr, None) if cfg is not None else None
                if isinstance(value, int) and not isinstance(value, bool) and value > 1:
                    counts.add(value)
    return counts


class _Context:
    """What the per-module decision needs to know about the whole model (computed once)."""

    def __init__(
        self,
        model: nn.Module,
        recipe: object,
        skip: tuple[str, ...],
        include_lm_head: bool,
        real_te: bool,
        fuse: tuple[tuple[str, ...], ...] = (),
    ):
        self.skip, self.include_lm_head, self.real_te, self.fuse = skip, include_lm_head, real_te, fuse
        self.align = 32 if recipe == "mxfp8" else 16
        self.fp32_keywords = get_fp32_module_keywords(model)
        self.expert_counts = _expert_counts(model)
        get_out = getattr(model, "get_output_embeddings", None)
        self.output = get_out() if callable(get_out) else None
        self.embeddings = {
            id(m.weight): name for name, m in model.named_modules() if isinstance(m, nn.Embedding)
        }
        self.parents = dict(model.named_modules(remove_duplicate=False))


def _is_router(name: str, linear: nn.Linear, ctx: _Context) -> bool:
    segments = name.split(".")
    if any(s in ROUTER_SEGMENTS for s in segments):
        return True
    if linear.out_features in ctx.expert_counts:
        parent = ctx.parents.get(".".join(segments[:-1]))
        return parent is not None and isinstance(getattr(parent, "experts", None), nn.Module)
    return False


def _reason(name: str, linear: nn.Module, ctx: _Context) -> str:
    """Why `linear` is not swapped ("" when it is eligible)."""
    if type(linear) is not nn.Linear:
        return f"{type(linear).__qualname__} subclasses nn.Linear (its forward is not plain F.linear)"
    if ctx.skip and name_matches(name, ctx.skip):
        return f"skipped by skip={list(ctx.skip)}"
    if not ctx.include_lm_head and (linear is ctx.output or "lm_head" in name.split(".")):
        return "output projection (lm_head); include_lm_head=True swaps it"
    weight = linear.weight
    if id(weight) in ctx.embeddings:
        return f"weight tied to embedding {ctx.embeddings[id(weight)] or 'root'}"
    if ctx.fp32_keywords and (
        name_matches(name, ctx.fp32_keywords) or name_matches(f"{name}.weight", ctx.fp32_keywords)
    ):
        return "kept in fp32 by _keep_in_fp32_modules(_strict)"
    if _is_router(name, linear, ctx):
        return "MoE router/gate (routing logits stay in high precision)"
    if "experts" in name.split(".")[:-1]:
        return "MoE expert (its token count varies per step; FP8 GEMMs need multiples of 16)"
    if has_dtensor_params(linear):
        return "DTensor weight (tensor-parallel/FSDP-sharded): inject before sharding"
    if weight.is_meta:
        return (
            "weight on the meta device: materialize and load weights first (HF init does not know TE modules)"
        )
    if linear._forward_hooks or linear._forward_pre_hooks or linear._backward_hooks:
        return "has module hooks (they would not move to the TE module)"
    if weight.dtype not in _DTYPES:
        return f"weight dtype {weight.dtype} (expected float16, bfloat16 or float32)"
    for attr in ("in_features", "out_features"):
        value = getattr(linear, attr)
        if value % ctx.align:
            return f"{attr}={value} is not a multiple of {ctx.align} (FP8 GEMM)"
    if ctx.real_te and weight.device.type != TE_DEVICE_TYPE:
        return (
            f"weight on {weight.device}: transformer_engine.pytorch.Linear runs on {TE_DEVICE_TYPE.upper()}"
        )
    return ""


def _walk(model: nn.Module, ctx: _Context) -> list[tuple[str, nn.Module, nn.Module, str, str]]:
    """(path, parent, module, child name, reason) for every linear-like child, every occurrence."""
    rows = []
    for parent_name, parent in ctx.parents.items():
        for child_name, child in parent._modules.items():
            if child is None or not (isinstance(child, nn.Linear) or is_swapped(child)):
                continue
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if is_swapped(child):
                reason = "swapped"
            elif getattr(parent, "_am_te_fused_mlp", False):
                reason = "runs inside a TE LayerNormMLP (inject_te_mlp)"
            else:
                reason = _reason(path, child, ctx)
            rows.append((path, parent, child, child_name, reason))
    return rows


Row = tuple[str, nn.Module, nn.Module, str, str]


def _is_cross_attention(path: str, parent: nn.Module) -> bool:
    where = [type(parent).__name__, *path.split(".")[:-1]]
    return any(marker in part.lower().replace("_", "") for part in where for marker in _CROSS_ATTENTION)


def _check_fuse(fuse: object) -> tuple[tuple[str, ...], ...]:
    """`fuse` as the sibling groups to fuse: True is `FUSED_SIBLINGS`, False none, else the groups given."""
    if isinstance(fuse, bool):
        return FUSED_SIBLINGS if fuse else ()
    expected = "True, False or groups of sibling names such as [('q_proj', 'k_proj', 'v_proj')]"
    if isinstance(fuse, (str, bytes)) or not isinstance(fuse, Iterable):
        raise TypeError(f"fuse must be {expected}, got {fuse!r}")
    groups = tuple(tuple(g) if isinstance(g, (list, tuple)) else g for g in fuse)
    names = [n for g in groups if isinstance(g, tuple) for n in g]
    if not all(
        isinstance(g, tuple) and len(g) >= 2 and all(isinstance(n, str) and n for n in g) for g in groups
    ):
        raise TypeError(f"fuse must be {expected}, got {fuse!r}")
    if not groups:
        raise ValueError("fuse: no groups given; pass False to fuse nothing")
    if len(set(names)) != len(names):
        raise ValueError(f"fuse: a name may be in one group only, got {fuse!r}")
    return groups


def _fusable(eligible: list[Row], spec: tuple[tuple[str, ...], ...]) -> list[list[Row]]:
    """The groups of `spec` that can share one TE Linear (each module in at most one group)."""
    registrations = Counter(id(row[2]) for row in eligible)
    by_parent: dict[int, dict[str, Row]] = {}
    for row in eligible:
        if registrations[id(row[2])] == 1:  # a module registered twice keeps its own TE Linear
            by_parent.setdefault(id(row[1]), {})[row[3]] = row
    groups = []
    for children in by_parent.values():
        for names in spec:
            rows = [children[n] for n in names if n in children]
            if len(rows) < 2 or _is_cross_attention(rows[0][0], rows[0][1]):
                continue
            same = {
                (m.in_features, m.weight.dtype, m.weight.device, m.bias is None) for _, _, m, _, _ in rows
            }
            if len(same) == 1:
                groups.append(rows)
    return groups


def _fused_with(groups: list[list[Row]]) -> dict[int, str]:
    return {
        id(row[2]): ", ".join(other[3] for other in group if other is not row)
        for group in groups
        for row in group
    }


def _context(model, recipe, skip, include_lm_head, linear_cls, fuse=False) -> _Context:
    check_model(model)
    recipe = check_recipe(recipe)
    check_bool(include_lm_head, "include_lm_head")
    if linear_cls is not None and not callable(linear_cls):
        raise TypeError(
            f"linear_cls must be None or a class/callable like transformer_engine.pytorch.Linear, got {linear_cls!r}"
        )
    return _Context(
        model, recipe, _check_skip(skip), include_lm_head, real_te=linear_cls is None, fuse=_check_fuse(fuse)
    )


def plan_te_linear(
    model: nn.Module,
    *,
    recipe: object = "current",
    skip: Iterable[str] = (),
    include_lm_head: bool = False,
    linear_cls: Callable[..., nn.Module] | None = None,
    fuse: bool | Iterable[Sequence[str]] = False,
) -> list[PlanRow]:
    """For each `nn.Linear` (and each module we swapped in): `(name, taken, reason)`; pure."""
    ctx = _context(model, recipe, skip, include_lm_head, linear_cls, fuse)
    walked = _walk(model, ctx)
    return _rows(walked, _fused_with(_fusable([r for r in walked if not r[4]], ctx.fuse)))


def _rows(walked: list[Row], fused_with: dict[int, str]) -> list[PlanRow]:
    rows, seen = [], set()
    for path, _parent, child, _name, reason in walked:
        if id(child) not in seen:  # a module registered under two names is listed once
            seen.add(id(child))
            taken = reason in ("", "swapped")
            if not reason:
                reason = f"{child.in_features}->{child.out_features}"
                if id(child) in fused_with:
                    reason += f", one GEMM with {fused_with[id(child)]}"
            rows.append(PlanRow(path, taken, reason))
    return rows


def _own_parameters(te: nn.Module, expected: dict[str, torch.Size], cls: Callable[..., nn.Module]) -> None:
    own = {n: p.shape for n, p in te.named_parameters(recurse=False)}
    if own != expected:
        what = f"{getattr(cls, '__module__', '')}.{getattr(cls, '__qualname__', cls)}"
        raise contract_error(
            what,
            f"expected parameters { {n: tuple(s) for n, s in expected.items()} }, found "
            f"{ {n: tuple(s) for n, s in own.items()} }",
            library="transformer_engine",
        )


def _build(linear: nn.Linear, cls: Callable[..., nn.Module]) -> nn.Module:
    weight, bias = linear.weight, linear.bias
    te = cls(
        linear.in_features,
        linear.out_features,
        bias=bias is not None,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    _own_parameters(te, {n: p.shape for n, p in linear.named_parameters(recurse=False)}, cls)
    te.weight = weight  # the original Parameter objects: no copy, ties and optimizer state kept
    if bias is not None:
        te.bias = bias
    te.train(linear.training)
    return te


def _build_group(rows: list[Row], cls: Callable[..., nn.Module]) -> list[FusedProjection]:
    """One TE Linear (`parameters_split`) holding the members' own Parameters; a FusedProjection per member."""
    linears = [row[2] for row in rows]
    split = {row[3]: linear.out_features for row, linear in zip(rows, linears)}
    first = linears[0]
    te = cls(
        first.in_features,
        sum(split.values()),
        bias=first.bias is not None,
        params_dtype=first.weight.dtype,
        device=first.weight.device,
        parameters_split=split,
    )
    own = {}
    for name, linear in zip(split, linears):
        for te_name, attr in zip(split_parameter_names(name), ("weight", "bias")):
            if getattr(linear, attr) is not None:
                own[te_name] = getattr(linear, attr)
    _own_parameters(te, {n: p.shape for n, p in own.items()}, cls)
    _require_first_microbatch_arg(type(te))(type(te).forward)
    for te_name, parameter in own.items():
        setattr(te, te_name, parameter)  # the original Parameter objects
    te.train(first.training)
    group = FusedGroup(te, list(split.values()))
    return [FusedProjection(linear, group, i) for i, linear in enumerate(linears)]


def _record(model: nn.Module, attr: str = RECORD_ATTR) -> PatchSet | None:
    record = vars(model).get(attr)
    return record if isinstance(record, PatchSet) else None


def revert_record(model: nn.Module, attr: str) -> bool:
    """Revert the handle recorded on `model` under `attr`; False when there is none."""
    check_model(model)
    record = _record(model, attr)
    if record is None:
        return False
    record.revert()
    return True


def inject_te_linear(
    model: nn.Module,
    *,
    recipe: object = "current",
    skip: Iterable[str] = (),
    include_lm_head: bool = False,
    linear_cls: Callable[..., nn.Module] | None = None,
    fuse: bool | Iterable[Sequence[str]] = False,
) -> PatchSet:
    """Swap every eligible `nn.Linear` for a TE Linear holding the same Parameters; returns the handle.

    `recipe` is checked here (name in FP8_RECIPES, a TEFp8Config or a TE recipe object; "mxfp8" needs
    multiples of 32) and kept as `handle.recipe` for `te_fp8_autocast`. `linear_cls` builds the modules
    (default `transformer_engine.pytorch.Linear`; tests pass `ReferenceTELinear`). The handle is a `PatchSet`
    (`.revert()`, context manager) with `.taken` (swapped names) and `.plan`; a second call returns it.
    `fuse=True` gives each group of `FUSED_SIBLINGS` one TE Linear (TE's `parameters_split`); a list of
    name groups, e.g. `[("q_proj", "k_proj", "v_proj")]`, fuses those only.
    ValueError when no linear is eligible, ImportError without transformer-engine (and no `linear_cls`).
    Call after casting and loading weights, before Liger, TE attention, packing and FSDP wrapping.
    """
    ctx = _context(model, recipe, skip, include_lm_head, linear_cls, fuse)
    existing = _record(model)
    if existing is not None and existing.applied:
        return existing
    cls = linear_cls if linear_cls is not None else load_te().Linear
    rows = _walk(model, ctx)
    eligible = [r for r in rows if not r[4]]
    if not eligible:
        reasons: dict[str, int] = {}
        for *_, reason in rows:
            reasons[reason] = reasons.get(reason, 0) + 1
        raise ValueError(
            f"inject_te_linear: {type(model).__name__} has no nn.Linear that can run on TE "
            f"({len(rows)} linear modules; reasons: {reasons or 'no nn.Linear at all'})"
        )
    groups = _fusable(eligible, ctx.fuse)
    built: dict[int, nn.Module] = {}
    patches: list[Patch] = []
    taken: list[str] = []
    for group in groups:
        for (path, parent, child, child_name, _), member in zip(group, _build_group(group, cls)):
            built[id(child)] = member
            patches.append(ItemPatch(parent._modules, child_name, member, label=f"{path} (module)"))
            taken.append(path)
    for path, parent, child, child_name, _ in eligible:
        if isinstance(built.get(id(child)), FusedProjection):
            continue
        te = built.get(id(child))
        if te is None:
            te = built[id(child)] = _build(child, cls)
            forward = types.MethodType(_flagged_forward, te)
            patches.append(Patch(te, "forward", forward, contract=_forward_contract(type(te))))
            taken.append(path)
        patches.append(ItemPatch(parent._modules, child_name, te, label=f"{path} (module)"))
    handle = PatchSet(name="am_precision.te_linear")
    handle.patches = [*patches, Patch(model, RECORD_ATTR, handle)]
    pairs = [(child, built[id(child)]) for _, _, child, _, _ in eligible]
    handle.on_revert.append(functools.partial(_sync_mode, pairs))  # deepcopy-safe, unlike a closure
    handle.taken = taken  # type: ignore[attr-defined]
    handle.recipe = check_recipe(recipe)  # type: ignore[attr-defined]
    handle.plan = _rows(rows, _fused_with(groups))  # type: ignore[attr-defined]
    return handle.apply()


def _sync_mode(pairs: list[tuple[nn.Module, nn.Module]], _handle: PatchSet) -> None:
    # model.train()/eval() reached only the TE modules while they were in the tree.
    for original, te in pairs:
        original.train(te.training)


def _forward_contract(cls: type) -> Callable[[Any], None]:
    check = _require_first_microbatch_arg(cls)
    return lambda _live: check(cls.forward)


def remove_te_linear(model: nn.Module) -> bool:
    """Undo `inject_te_linear` on `model` (the original modules come back, by identity); False when none."""
    return revert_record(model, RECORD_ATTR)


def get_plain_state_dict(model: nn.Module) -> dict[str, Any]:
    """`model.state_dict()` without the `_extra_state` entries of swapped TE Linears: loads into the plain model."""
    check_model(model)
    drop = {
        f"{name}._extra_state" if name else "_extra_state"
        for name, m in model.named_modules()
        if is_swapped(m)
    }
    return {k: v for k, v in model.state_dict().items() if k not in drop}
