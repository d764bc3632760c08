"""Property suite: every public function fed a wrong type or value for one argument raises only
ValueError/TypeError, and the message names that argument (never an AttributeError, a NaN or a coercion)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import am_precision as ap

# Values of every kind a caller might pass by mistake; each case below filters out the valid ones.
ANYTHING = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.binary(max_size=3),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(object),
    st.sampled_from(
        [torch.int64, torch.bool, torch.complex64, torch.zeros(2), torch.zeros(2, dtype=torch.long)]
    ),
)


def _floating_dtype(v: Any) -> bool:
    return isinstance(v, torch.dtype) and v.is_floating_point


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _eps(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def _device(v: Any) -> bool:
    if v is None or (isinstance(v, int) and not isinstance(v, bool)):
        return True  # an int is a valid (CUDA) device index: not a wrong type
    if not isinstance(v, str):
        return False
    try:
        torch.device(v)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def _skip_modules(v: Any) -> bool:
    """Valid skip_modules for `_model()` (an nn.Sequential whose one child is "0")."""
    if isinstance(v, (str, bytes)):
        return False
    try:
        names = tuple(v)
    except TypeError:
        return False
    return all(isinstance(n, str) and n == "0" for n in names)


def _dtype_name(v: Any) -> bool:
    from am_precision.config import dtype_from_str

    try:
        dtype_from_str(v)
    except (TypeError, ValueError):
        return False
    return True


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4))


class _Config:
    rope_parameters = {"rope_theta": 10000.0}  # noqa: RUF012


# (case id, argument name, call with the bad value, predicate of the values that are valid there)
CASES: list[tuple[str, str, Callable[[Any], Any], Callable[[Any], bool]]] = [
    ("cast_model_to_dtype", "model", lambda v: ap.cast_model_to_dtype(v), lambda v: False),
    ("cast_model_to_dtype", "dtype", lambda v: ap.cast_model_to_dtype(_model(), v), _floating_dtype),
    (
        "cast_model_to_dtype",
        "skip_modules",
        lambda v: ap.cast_model_to_dtype(_model(), torch.bfloat16, v),
        _skip_modules,
    ),
    ("yield_fp32_model", "model", lambda v: ap.yield_fp32_model(v), lambda v: False),
    (
        "yield_fp32_model",
        "restore_dtype",
        lambda v: ap.yield_fp32_model(_model(), v),
        lambda v: v is None or _floating_dtype(v),
    ),
    (
        "cast_frozen_modules_to_compute_dtype",
        "model",
        lambda v: ap.cast_frozen_modules_to_compute_dtype(v, torch.bfloat16),
        lambda v: False,
    ),
    (
        "cast_frozen_modules_to_compute_dtype",
        "compute_dtype",
        lambda v: ap.cast_frozen_modules_to_compute_dtype(_model(), v),
        lambda v: v is None or _floating_dtype(v),
    ),
    ("get_fp32_module_keywords", "model", lambda v: ap.get_fp32_module_keywords(v), lambda v: False),
    (
        "get_fp32_module_keywords",
        "dtype",
        lambda v: ap.get_fp32_module_keywords(_model(), dtype=v),
        lambda v: v is None or _floating_dtype(v),
    ),
    ("get_fp32_parameter_names", "model", lambda v: ap.get_fp32_parameter_names(v), lambda v: False),
    (
        "get_fp32_parameter_names",
        "dtype",
        lambda v: ap.get_fp32_parameter_names(_model(), v),
        _floating_dtype,
    ),
    ("Float32RMSNorm", "dim", lambda v: ap.Float32RMSNorm(v), _positive_int),
    ("Float32RMSNorm", "eps", lambda v: ap.Float32RMSNorm(4, eps=v), _eps),
    ("Float32RMSNorm", "dtype", lambda v: ap.Float32RMSNorm(4, dtype=v), _floating_dtype),
    ("Float32RMSNorm", "device", lambda v: ap.Float32RMSNorm(4, device=v), _device),
    (
        "Float32RMSNorm",
        "use_compile",
        lambda v: ap.Float32RMSNorm(4, use_compile=v),
        lambda v: v is None or isinstance(v, bool),
    ),
    (
        "float32_rms_norm",
        "x",
        lambda v: ap.float32_rms_norm(v, torch.ones(4), 1e-5),
        lambda v: isinstance(v, torch.Tensor),
    ),
    (
        "float32_rms_norm",
        "weight",
        lambda v: ap.float32_rms_norm(torch.ones(2, 4), v, 1e-5),
        lambda v: isinstance(v, torch.Tensor),
    ),
    ("float32_rms_norm", "eps", lambda v: ap.float32_rms_norm(torch.ones(2, 4), torch.ones(4), v), _eps),
    (
        "initialize_linear_module",
        "linear_impl",
        lambda v: ap.initialize_linear_module(v, 4, 4),
        lambda v: v in ("torch", "te"),
    ),
    (
        "initialize_linear_module",
        "in_features",
        lambda v: ap.initialize_linear_module("torch", v, 4),
        _positive_int,
    ),
    (
        "initialize_linear_module",
        "out_features",
        lambda v: ap.initialize_linear_module("torch", 4, v),
        _positive_int,
    ),
    (
        "initialize_linear_module",
        "bias",
        lambda v: ap.initialize_linear_module("torch", 4, 4, v),
        lambda v: isinstance(v, bool),
    ),
    (
        "initialize_linear_module",
        "dtype",
        lambda v: ap.initialize_linear_module("torch", 4, 4, dtype=v),
        _floating_dtype,
    ),
    (
        "initialize_rms_norm_module",
        "rms_norm_impl",
        lambda v: ap.initialize_rms_norm_module(v, 4),
        lambda v: v in ("torch", "torch_fp32", "te"),
    ),
    ("initialize_rms_norm_module", "dim", lambda v: ap.initialize_rms_norm_module("torch", v), _positive_int),
    ("initialize_rms_norm_module", "eps", lambda v: ap.initialize_rms_norm_module("torch", 4, v), _eps),
    (
        "compute_lm_head_logits",
        "lm_head",
        lambda v: ap.compute_lm_head_logits(v, torch.ones(2, 4)),
        lambda v: v is None,
    ),
    (
        "compute_lm_head_logits",
        "hidden_states",
        lambda v: ap.compute_lm_head_logits(nn.Linear(4, 4), v),
        lambda v: isinstance(v, torch.Tensor) and v.dim() in (2, 3),
    ),
    (
        "compute_lm_head_logits",
        "logits_to_keep",
        lambda v: ap.compute_lm_head_logits(nn.Linear(4, 4), torch.ones(2, 3, 4), v),
        lambda v: (
            (isinstance(v, int) and not isinstance(v, bool) and v >= 0)
            or (isinstance(v, torch.Tensor) and v.dim() == 1 and not v.is_floating_point())
        ),
    ),
    (
        "compute_lm_head_logits",
        "is_thd",
        lambda v: ap.compute_lm_head_logits(nn.Linear(4, 4), torch.ones(2, 4), is_thd=v),
        lambda v: isinstance(v, bool),
    ),
    (
        "compute_lm_head_logits",
        "fp32_lm_head",
        lambda v: ap.compute_lm_head_logits(nn.Linear(4, 4), torch.ones(2, 4), fp32_lm_head=v),
        lambda v: isinstance(v, bool),
    ),
    ("get_rope_config", "config", lambda v: ap.get_rope_config(v), lambda v: False),
    (
        "get_rope_config",
        "layer_type",
        lambda v: ap.get_rope_config(_Config(), layer_type=v),
        lambda v: v is None,
    ),
    (
        "is_tensor_unallocated",
        "tensor",
        lambda v: ap.is_tensor_unallocated(v),
        lambda v: isinstance(v, torch.Tensor),
    ),
    (
        "set_is_first_microbatch",
        "value",
        lambda v: ap.set_is_first_microbatch(v),
        lambda v: v is None or isinstance(v, bool),
    ),
    ("set_is_optim_step", "value", lambda v: ap.set_is_optim_step(v), lambda v: isinstance(v, bool)),
    ("make_lazy_te_patcher", "loader", lambda v: ap.make_lazy_te_patcher(v), lambda v: v is None),
    (
        "TEFp8Config",
        "recipe",
        lambda v: ap.TEFp8Config(recipe=v),
        lambda v: v in ("current", "block", "mxfp8") or type(v) is object,  # any other object: a TE recipe
    ),
]


def _recipe_ok(v: Any) -> bool:
    return (isinstance(v, str) and v in ap.FP8_RECIPES) or type(v) is object  # any other object: a TE recipe


def _names_ok(v: Any) -> bool:
    return (
        isinstance(v, (list, tuple, dict))
        and not isinstance(v, str)
        and all(isinstance(s, str) and s and "" not in s.split(".") for s in v)
    )


def _tiny_linear_model() -> nn.Module:
    model = nn.Sequential(nn.Linear(16, 16))
    return model


def _enter(context: Any) -> None:
    with context:
        pass


CASES += [
    ("build_fp8_recipe", "recipe", lambda v: ap.build_fp8_recipe(v), _recipe_ok),
    ("te_fp8_autocast", "recipe", lambda v: ap.te_fp8_autocast(v), _recipe_ok),
    ("te_fp8_autocast", "enabled", lambda v: ap.te_fp8_autocast(enabled=v), lambda v: isinstance(v, bool)),
    ("plan_te_linear", "model", lambda v: ap.plan_te_linear(v), lambda v: False),
    (
        "plan_te_linear",
        "recipe",
        lambda v: ap.plan_te_linear(_tiny_linear_model(), recipe=v, linear_cls=ap.ReferenceTELinear),
        _recipe_ok,
    ),
    (
        "plan_te_linear",
        "skip",
        lambda v: ap.plan_te_linear(_tiny_linear_model(), skip=v, linear_cls=ap.ReferenceTELinear),
        _names_ok,
    ),
    (
        "plan_te_linear",
        "include_lm_head",
        lambda v: ap.plan_te_linear(_tiny_linear_model(), include_lm_head=v, linear_cls=ap.ReferenceTELinear),
        lambda v: isinstance(v, bool),
    ),
    (
        "inject_te_linear",
        "linear_cls",
        lambda v: ap.inject_te_linear(_tiny_linear_model(), linear_cls=v),
        lambda v: v is None or callable(v),
    ),
    ("inject_te_linear", "model", lambda v: ap.inject_te_linear(v), lambda v: False),
    ("remove_te_linear", "model", lambda v: ap.remove_te_linear(v), lambda v: False),
    ("plan_te_mlp", "model", lambda v: ap.plan_te_mlp(v), lambda v: False),
    (
        "plan_te_mlp",
        "recipe",
        lambda v: ap.plan_te_mlp(_tiny_linear_model(), recipe=v, mlp_cls=ap.ReferenceTELayerNormMLP),
        _recipe_ok,
    ),
    (
        "inject_te_mlp",
        "mlp_cls",
        lambda v: ap.inject_te_mlp(_tiny_linear_model(), mlp_cls=v),
        lambda v: v is None or callable(v),
    ),
    ("inject_te_mlp", "model", lambda v: ap.inject_te_mlp(v), lambda v: False),
    ("remove_te_mlp", "model", lambda v: ap.remove_te_mlp(v), lambda v: False),
    (
        "ReferenceTELayerNormMLP",
        "ffn_hidden_size",
        lambda v: ap.ReferenceTELayerNormMLP(16, v, bias=False, normalization="RMSNorm", activation="swiglu"),
        _positive_int,
    ),
    ("get_plain_state_dict", "model", lambda v: ap.get_plain_state_dict(v), lambda v: False),
    (
        "iter_microbatches",
        "microbatches",
        lambda v: list(ap.iter_microbatches(v)),
        lambda v: (
            isinstance(v, (list, dict, torch.Tensor)) and not (isinstance(v, torch.Tensor) and v.dim() == 0)
        ),
    ),
    (
        "ReferenceTELinear",
        "in_features",
        lambda v: ap.ReferenceTELinear(v, 16, device="cpu"),
        _positive_int,
    ),
    (
        "ReferenceTELinear",
        "bias",
        lambda v: ap.ReferenceTELinear(16, 16, bias=v, device="cpu"),
        lambda v: isinstance(v, bool),
    ),
    (
        "reference_fp8_autocast",
        "enabled",
        lambda v: _enter(ap.reference_fp8_autocast(v)),
        lambda v: isinstance(v, bool),
    ),
]

_CHOICES = {
    # "te" is valid too (without transformer-engine it is an ImportError with the install line).
    "attn": ("te", "sdpa", "flex", "eager", "tilelang"),
    "linear": ("te", "torch"),
    "rms_norm": ("te", "torch", "torch_fp32"),
    "experts": ("torch", "torch_mm", "torch_mm_mxfp8", "gmm", "te"),
    "dispatcher": ("torch", "deepep", "hybridep", "uccl_ep"),
}
for _field, _allowed in _CHOICES.items():
    CASES.append(
        (
            "BackendConfig",
            _field,
            lambda v, f=_field: ap.BackendConfig(**{f: v}),
            lambda v, a=_allowed: isinstance(v, str) and v in a,
        )
    )
for _field in ("rope_fusion", "fake_balanced_gate", "compile_attn", "enable_fsdp_optimizations"):
    CASES.append(
        (
            "BackendConfig",
            _field,
            lambda v, f=_field: ap.BackendConfig(**{f: v}),
            lambda v: isinstance(v, bool),
        )
    )
CASES += [
    (
        "BackendConfig",
        "dispatcher_num_sms",
        lambda v: ap.BackendConfig(dispatcher_num_sms=v),
        _positive_int,
    ),
    (
        "BackendConfig",
        "fake_gate_noise",
        lambda v: ap.BackendConfig(fake_gate_noise=v),
        lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1,
    ),
    (
        "BackendConfig",
        "gate_precision",
        lambda v: ap.BackendConfig(gate_precision=v),
        lambda v: v is None or _floating_dtype(v) or _dtype_name(v),
    ),
    ("BackendConfig", "te_fp8", lambda v: ap.BackendConfig(te_fp8=v), lambda v: v is None),
]


@pytest.mark.parametrize(
    ("function", "argument", "call", "valid"), CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES]
)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(data=st.data())
def test_bad_argument_is_a_value_or_type_error_naming_it(function, argument, call, valid, data):
    value = data.draw(ANYTHING.filter(lambda v: not _safe(valid, v)), label=argument)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        with pytest.raises((ValueError, TypeError)) as info:
            call(value)
    assert argument in str(info.value), f"{function}({argument}={value!r}): {info.value}"


def _safe(valid: Callable[[Any], bool], value: Any) -> bool:
    try:
        return bool(valid(value))
    except (TypeError, RuntimeError):  # e.g. `tensor in (...)`: not a valid value
        return False


def test_every_public_function_is_covered():
    """A new public function must get a row above (classes count as their constructor)."""
    covered = {c[0] for c in CASES}
    takes_no_argument = {
        "compile_unavailable_reason",
        "get_is_first_microbatch",
        "get_is_optim_step",
        "patch_te_modules",
        "unpatch_te_modules",
    }
    public = {n for n in ap.__all__ if callable(getattr(ap, n)) and not n.startswith("HAVE_")}
    assert public - covered - takes_no_argument == set()
