"""Run a decoder layer's post-attention RMSNorm and gated-SiLU MLP as one Transformer Engine `LayerNormMLP`.

With FP8 linears, a ~1B decoder step spends a fifth of its GPU time around the MLP's GEMMs, not in them: the
norm, casting its output to FP8, the gate/up outputs, SwiGLU and casting its output again. TE's LayerNormMLP
does RMSNorm+cast, one [gate; up] GEMM, SwiGLU+cast and the down GEMM in one call with fused kernels.

`inject_te_mlp(model)` replaces, in every decoder layer that has both, the `post_attention_layernorm` child by
a `NormInMLP` (holds the norm's weight, returns its input unchanged) and the `mlp` child by a `FusedNormMLP`
(holds the original gate/up/down modules, runs the TE module). Parameters stay the originals' objects and keep
the plain HF `state_dict` keys: TE's `layer_norm_weight`/`fc2_weight` are set to the norm's and down_proj's
Parameters, and its `fc1_weight` is `cat([gate_proj.weight, up_proj.weight])` per call (TE applies SiLU to
the first half). `remove_te_mlp(model)` puts the original modules back (identity, trained values).

Exact or refused, in three checks:
- per layer, before any swap: the pair `mlp(norm(x))` must equal `down(silu(gate(n)) * up(n))` with
  `n = rmsnorm(x)` (weight `w` or zero-centered `1 + w`, the norm's own eps) on a probe input, whatever
  forwards are installed (HF, Liger); a GELU MLP, a LayerNorm, biases or hooks are refused with the reason;
- once per model, after the swap: the model's output on a probe input equals the unswapped model's (a decoder
  layer that uses the norm's output for more than its MLP, e.g. parallel attention, fails here, is reverted);
- every call: the MLP's input must be the tensor the `NormInMLP` just returned, unmodified; else RuntimeError.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._args import check_model
from ._eager import run_eager
from ._patch import ItemPatch, Patch, PatchSet
from .fp8 import check_recipe, te_fp8_autocast
from .fp32_rules import has_dtensor_params
from .microbatch import get_is_first_microbatch
from .te_lazy import _require_first_microbatch_arg, load_te
from .te_linear import (
    _DTYPES,
    TE_DEVICE_TYPE,
    PlanRow,
    _own_parameters,
    _record,
    _sync_mode,
    revert_record,
)
from .te_reference import reference_fp8_autocast

__all__ = ["FusedNormMLP", "NormInMLP", "inject_te_mlp", "plan_te_mlp", "remove_te_mlp"]

RECORD_ATTR = "_am_te_mlp"
# (norm child, MLP child) of one decoder layer: the MLP reads the norm's output and nothing else does.
NORM_MLP_PAIRS = (("post_attention_layernorm", "mlp"),)
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_EPS_ATTRS = ("variance_epsilon", "eps", "epsilon")
_PROBE_ROWS = 8
# Relative L2 error allowed against the fp32 formula / the unswapped model: rounding of the module's dtype
# through a norm and three GEMMs (bf16: 2^-8 per rounding, a few roundings per element); a wrong formula or a
# misplaced norm is off by O(1).
_PROBE_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class NormInMLP(nn.Module):
    """Stands where the RMSNorm was: keeps its weight (and key); the norm itself runs inside `FusedNormMLP`."""

    def __init__(self, norm: nn.Module, mlp: FusedNormMLP) -> None:
        super().__init__()
        self.weight = norm.weight
        object.__setattr__(self, "mlp", mlp)  # not a submodule: the MLP is its sibling in the layer
        self.train(norm.training)

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if args or kwargs:
            raise TypeError(
                f"{type(self).__name__}.forward takes the hidden states only (as the RMSNorm it replaces), "
                f"got {len(args)} more positional and {sorted(kwargs)} keyword arguments"
            )
        run_eager(self.mlp._hand, hidden)
        return hidden


class FusedNormMLP(nn.Module):
    """Stands where the MLP was: its gate/up/down modules (for their Parameters and keys) and one TE module."""

    _am_te_fused_mlp = True  # inject_te_linear leaves the modules inside alone

    def __init__(self, mlp: nn.Module, te: nn.Module) -> None:
        super().__init__()
        for name in PROJECTIONS:
            self.add_module(name, getattr(mlp, name))
        object.__setattr__(self, "te", te)  # not a submodule: it holds the same Parameters, listed once here
        self._handed: tuple[torch.Tensor, int] | None = None
        self.train(mlp.training)

    def _hand(self, hidden: torch.Tensor) -> None:
        self._handed = (hidden, hidden._version)

    def forward(self, hidden: torch.Tensor, is_first_microbatch: bool | None = None) -> torch.Tensor:
        return run_eager(self._run, hidden, is_first_microbatch)

    def _run(self, hidden: torch.Tensor, is_first_microbatch: bool | None) -> torch.Tensor:
        handed, self._handed = self._handed, None
        if handed is None or handed[0] is not hidden or handed[1] != hidden._version:
            raise RuntimeError(
                f"{type(self).__name__}.forward: its input is not the unmodified tensor the layer's norm "
                "(NormInMLP) just returned; the norm runs inside this module, so the layer must call the MLP "
                "on the norm's output and nothing else. remove_te_mlp(model) restores the original modules"
            )
        if is_first_microbatch is None:
            is_first_microbatch = get_is_first_microbatch()
        te = self.te
        if te.training != self.training:
            te.train(self.training)
        te.fc1_weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        try:
            return te(hidden, is_first_microbatch)
        finally:
            te.fc1_weight = None  # the autograd graph keeps what the backward needs

    def __getstate__(self) -> dict[str, Any]:
        # deepcopy/pickle between the norm's and the MLP's call must not copy a live activation.
        return {**self.__dict__, "_handed": None}

    def extra_repr(self) -> str:
        return f"one {type(self.te).__name__} (RMSNorm, [gate; up], SwiGLU, down)"


def _eps(norm: nn.Module) -> float | None:
    for attr in _EPS_ATTRS:
        value = getattr(norm, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return float(value)
    return None


def _hooked(*modules: nn.Module) -> bool:
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in modules)


def _static_reason(norm: nn.Module, mlp: nn.Module, align: int, real_te: bool) -> str:
    """Why the pair cannot be one LayerNormMLP, judged from its modules ("" when it may be)."""
    projections = [getattr(mlp, n, None) for n in PROJECTIONS]
    if not all(isinstance(p, nn.Module) for p in projections):
        return f"{type(mlp).__name__} has no {'/'.join(PROJECTIONS)} modules (not a gated MLP)"
    weight = getattr(norm, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 1:
        return f"{type(norm).__name__} has no 1-d weight Parameter (not an RMSNorm)"
    if isinstance(getattr(norm, "bias", None), torch.Tensor):
        return f"{type(norm).__name__} has a bias (a LayerNorm, not an RMSNorm)"
    if _eps(norm) is None:
        return f"{type(norm).__name__} has no eps attribute ({', '.join(_EPS_ATTRS)})"
    hidden = weight.shape[0]
    gate, up, down = (getattr(p, "weight", None) for p in projections)
    if not all(isinstance(w, nn.Parameter) for w in (gate, up, down)):
        return "a projection has no weight Parameter"
    # TE's Linear (swapped by inject_te_linear) keeps an empty tensor where there is no bias.
    if any(isinstance(b := getattr(p, "bias", None), torch.Tensor) and b.numel() for p in projections):
        return "a projection has a bias (TE's LayerNormMLP is built without)"
    inter = gate.shape[0]
    if gate.shape != (inter, hidden) or up.shape != (inter, hidden) or down.shape != (hidden, inter):
        return (
            f"projection shapes gate {tuple(gate.shape)}, up {tuple(up.shape)}, down {tuple(down.shape)} "
            f"do not chain from hidden size {hidden}"
        )
    tensors = (weight, gate, up, down)
    if len({(t.dtype, t.device) for t in tensors}) != 1:
        return "the norm and projections differ in dtype or device"
    if weight.dtype not in _DTYPES:
        return f"dtype {weight.dtype} (expected float16, bfloat16 or float32)"
    if any(has_dtensor_params(m) for m in (norm, *projections)):
        return "DTensor weights (tensor-parallel/FSDP-sharded): inject before sharding"
    if weight.is_meta:
        return "weights on the meta device: materialize and load weights first"
    if _hooked(norm, mlp, *projections):
        return "has module hooks (they would not move to the TE module)"
    for what, value in (("hidden size", hidden), ("intermediate size", inter)):
        if value % align:
            return f"{what} {value} is not a multiple of {align} (FP8 GEMM)"
    if real_te and weight.device.type != TE_DEVICE_TYPE:
        return f"weights on {weight.device}: transformer_engine.pytorch.LayerNormMLP runs on CUDA"
    return ""


def _probe_input(hidden: int, like: torch.Tensor) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, _PROBE_ROWS, hidden, generator=g)
    x[0, 0] *= 1e-3  # a row where eps matters
    return x.to(device=like.device, dtype=like.dtype)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.detach().float(), want.detach().float()
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


# Gates the probe must tell SiLU apart from: near 0 they agree to first order, so in bf16 an error within
# tolerance alone would not show a GELU MLP.
_OTHER_GATES = (F.gelu, functools.partial(F.gelu, approximate="tanh"))


def _behaviour(norm: nn.Module, mlp: nn.Module) -> tuple[str, bool]:
    """(reason, zero-centered gamma): the pair's output on a probe against the fp32 formula, both gamma forms.

    SiLU must fit within the dtype's tolerance and at least twice as well as any gate of `_OTHER_GATES`."""
    weight = norm.weight
    x = _probe_input(weight.shape[0], weight)
    with torch.no_grad():
        got = mlp(norm(x))
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _eps(norm))
        gate, up, down = (getattr(mlp, n).weight.float() for n in PROJECTIONS)
        errors = {}
        for zero_centered in (False, True):
            scaled = normed * (weight.float() + 1 if zero_centered else weight.float())
            for act in (F.silu, *_OTHER_GATES):
                want = F.linear(act(F.linear(scaled, gate)) * F.linear(scaled, up), down)
                errors[zero_centered, act is F.silu] = min(
                    errors.get((zero_centered, act is F.silu), float("inf")), _rel_error(got, want)
                )
    zero_centered = errors[True, True] < errors[False, True]
    silu, other = errors[zero_centered, True], errors[zero_centered, False]
    tol = _PROBE_TOL[weight.dtype]
    if silu <= tol and 2 * silu <= other:
        return "", zero_centered
    return (
        f"mlp(norm(x)) is not down(silu(gate(rmsnorm(x))) * up(rmsnorm(x))) on a probe input (relative "
        f"error {silu:.2g}, tolerance {tol:g} for {weight.dtype}; a GELU gate fits to {other:.2g})",
        False,
    )


Pair = tuple[str, nn.Module, str, str]  # (layer path, layer, norm child, MLP child)


def _pairs(model: nn.Module) -> list[Pair]:
    found, seen = [], set()
    for path, layer in model.named_modules():
        for norm_name, mlp_name in NORM_MLP_PAIRS:
            norm, mlp = layer._modules.get(norm_name), layer._modules.get(mlp_name)
            if norm is not None and mlp is not None and id(layer) not in seen:
                seen.add(id(layer))
                found.append((path, layer, norm_name, mlp_name))
    return found


def _judge(model: nn.Module, recipe: object, real_te: bool) -> list[tuple[Pair, str, bool]]:
    align = 32 if recipe == "mxfp8" else 16
    judged = []
    for pair in _pairs(model):
        _, layer, norm_name, mlp_name = pair
        norm, mlp = layer._modules[norm_name], layer._modules[mlp_name]
        if isinstance(mlp, FusedNormMLP):
            judged.append((pair, "swapped", False))
            continue
        reason = _static_reason(norm, mlp, align, real_te)
        zero_centered = False
        if not reason:
            reason, zero_centered = _behaviour(norm, mlp)
        judged.append((pair, reason, zero_centered))
    return judged


def _row(pair: Pair, reason: str) -> PlanRow:
    path, layer, norm_name, mlp_name = pair
    name = f"{path}.{mlp_name}" if path else mlp_name
    if reason in ("", "swapped"):
        mlp = layer._modules[mlp_name]
        hidden, inter = mlp.down_proj.weight.shape
        return PlanRow(name, True, reason or f"{norm_name} + {mlp_name} {hidden}->{inter}->{hidden}")
    return PlanRow(name, False, reason)


def _check_cls(mlp_cls: object) -> None:
    if mlp_cls is not None and not callable(mlp_cls):
        raise TypeError(
            "mlp_cls must be None or a class/callable like transformer_engine.pytorch.LayerNormMLP, "
            f"got {mlp_cls!r}"
        )


def plan_te_mlp(
    model: nn.Module, *, recipe: object = "current", mlp_cls: Callable[..., nn.Module] | None = None
) -> list[PlanRow]:
    """For each decoder layer's norm + MLP pair: `(mlp name, taken, reason)`; runs the per-layer probe only."""
    check_model(model)
    _check_cls(mlp_cls)
    return [_row(pair, reason) for pair, reason, _ in _judge(model, check_recipe(recipe), mlp_cls is None)]


def _build(norm: nn.Module, mlp: nn.Module, zero_centered: bool, cls: Callable[..., nn.Module]) -> nn.Module:
    weight = norm.weight
    hidden, inter = mlp.down_proj.weight.shape
    te = cls(
        hidden,
        inter,
        eps=_eps(norm),
        bias=False,
        normalization="RMSNorm",
        activation="swiglu",
        zero_centered_gamma=zero_centered,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    expected = {
        "layer_norm_weight": weight.shape,
        "fc1_weight": (2 * inter, hidden),
        "fc2_weight": (hidden, inter),
    }
    _own_parameters(te, {n: torch.Size(s) for n, s in expected.items()}, cls)
    _require_first_microbatch_arg(type(te))(type(te).forward)
    te.layer_norm_weight = weight  # the original Parameter objects
    te.fc2_weight = mlp.down_proj.weight
    del te.fc1_weight  # set per call from gate_proj/up_proj
    te.fc1_weight = None
    te.train(mlp.training)
    return te


@contextlib.contextmanager
def _probe_mode(model: nn.Module, real_te: bool) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    off = te_fp8_autocast(enabled=False) if real_te else reference_fp8_autocast(enabled=False)
    try:
        with torch.no_grad(), off:
            yield
    finally:
        for module, mode in modes:
            module.training = mode


def _model_output(model: nn.Module) -> torch.Tensor:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embeddings, nn.Embedding):
        raise RuntimeError(
            f"inject_te_mlp: {type(model).__name__} has no input nn.Embedding to probe the swap with"
        )
    ids = torch.arange(1, 1 + 2 * _PROBE_ROWS, device=embeddings.weight.device) % embeddings.num_embeddings
    try:
        out = model(input_ids=ids[None])
    except Exception as exc:
        raise RuntimeError(
            f"inject_te_mlp: the probe forward of {type(model).__name__} on input_ids of shape "
            f"{tuple(ids[None].shape)} failed ({type(exc).__name__}: {exc}); the swap is checked on it"
        ) from exc
    for field in ("logits", "last_hidden_state"):
        value = getattr(out, field, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, torch.Tensor):
        return out
    raise RuntimeError(f"inject_te_mlp: {type(model).__name__}'s output {type(out).__name__} has no logits")


def inject_te_mlp(
    model: nn.Module, *, recipe: object = "current", mlp_cls: Callable[..., nn.Module] | None = None
) -> PatchSet:
    """Run each decoder layer's post-attention RMSNorm + gated MLP as one TE LayerNormMLP; returns the handle.

    Probes each pair, then the whole model (see the module doc): ValueError when no layer qualifies,
    RuntimeError (nothing left swapped) when the swapped model's output differs from the original's.
    `recipe` only sets the FP8 alignment (mxfp8: multiples of 32) and `handle.recipe`; train inside
    `te_fp8_autocast`. `mlp_cls` builds the modules (default `transformer_engine.pytorch.LayerNormMLP`;
    tests pass `ReferenceTELayerNormMLP`). Call after Liger and before `inject_te_linear`.
    """
    check_model(model)
    _check_cls(mlp_cls)
    recipe = check_recipe(recipe)
    existing = _record(model, RECORD_ATTR)
    if existing is not None and existing.applied:
        return existing
    real_te = mlp_cls is None
    cls = mlp_cls if mlp_cls is not None else load_te().LayerNormMLP
    with _probe_mode(model, real_te):
        judged = _judge(model, recipe, real_te)
    eligible = [(pair, zc) for pair, reason, zc in judged if not reason]
    if not eligible:
        reasons: dict[str, int] = {}
        for _, reason, _ in judged:
            reasons[reason] = reasons.get(reason, 0) + 1
        raise ValueError(
            f"inject_te_mlp: {type(model).__name__} has no decoder layer whose norm + MLP can run as one "
            f"LayerNormMLP ({len(judged)} pairs named {NORM_MLP_PAIRS}; reasons: {reasons or 'none found'})"
        )
    patches: list[Patch] = []
    pairs = []
    for (path, layer, norm_name, mlp_name), zero_centered in eligible:
        norm, mlp = layer._modules[norm_name], layer._modules[mlp_name]
        fused = FusedNormMLP(mlp, _build(norm, mlp, zero_centered, cls))
        stand_in = NormInMLP(norm, fused)
        where = f"{path}." if path else ""
        patches.append(ItemPatch(layer._modules, norm_name, stand_in, label=f"{where}{norm_name}"))
        patches.append(ItemPatch(layer._modules, mlp_name, fused, label=f"{where}{mlp_name}"))
        pairs += [(norm, stand_in), (mlp, fused)]
    handle = PatchSet(name="am_precision.te_mlp")
    handle.patches = [*patches, Patch(model, RECORD_ATTR, handle)]
    handle.on_revert.append(functools.partial(_sync_mode, pairs))
    handle.taken = [_row(pair, "").name for pair, _ in eligible]  # type: ignore[attr-defined]
    handle.recipe = recipe  # type: ignore[attr-defined]
    handle.plan = [_row(pair, reason) for pair, reason, _ in judged]  # type: ignore[attr-defined]
    with _probe_mode(model, real_te):
        before = _model_output(model)
        handle.apply()
        try:
            error = _rel_error(_model_output(model), before)
        except BaseException:
            handle.revert()
            raise
    # The swapped modules' dtype sets the rounding, not the output's: some models upcast their logits.
    (_, layer, norm_name, _), _ = eligible[0]
    tol = _PROBE_TOL[layer._modules[norm_name].weight.dtype]
    if not error <= tol:
        handle.revert()
        raise RuntimeError(
            f"inject_te_mlp: {type(model).__name__}'s output on a probe input changed by {error:.2g} (relative, "
            f"> {tol:g}) when its layers' {NORM_MLP_PAIRS} ran as one LayerNormMLP: the decoder layer uses the "
            "norm's output for more than its MLP. Nothing is swapped"
        )
    return handle


def remove_te_mlp(model: nn.Module) -> bool:
    """Undo `inject_te_mlp` on `model` (the original norm and MLP modules come back); False when none."""
    return revert_record(model, RECORD_ATTR)
