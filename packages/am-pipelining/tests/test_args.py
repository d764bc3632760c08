"""Bad arguments to the public functions: only TypeError/ValueError, and the message names the argument."""

from __future__ import annotations

import functools

import pytest
import tiny_models as tm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import am_pipelining as pp
from am_pipelining.split import split_layer_ranges

MODEL = tm.build("llama")  # read-only here; a patch applied by an example is undone by it

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 8),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "2", "x", "gpu9", "cuda:x"]),
    st.lists(st.integers(-1, 3), max_size=4),
    st.tuples(st.floats(0, 3)),
    st.builds(object),
    st.just(MODEL.model.layers[0]),  # a module, but not a model
)
NOT_A_DEVICE = JUNK.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))


# (label, the argument the junk goes to, call taking the junk)
CASES = [
    (
        "get_pipeline_problems.num_stages",
        "num_stages",
        lambda v: pp.get_pipeline_problems(MODEL, num_stages=v),
    ),
    ("validate.model", "model", lambda v: pp.validate_hf_model_for_pipeline_support(v)),
    (
        "validate.num_stages",
        "num_stages",
        lambda v: pp.validate_hf_model_for_pipeline_support(MODEL, num_stages=v),
    ),
    ("get_stage_plan.model", "model", lambda v: pp.get_stage_plan(v, 2)),
    ("get_stage_plan.num_stages", "num_stages", lambda v: pp.get_stage_plan(MODEL, v)),
    (
        "get_stage_plan.layers_per_stage",
        "layers_per_stage",
        lambda v: pp.get_stage_plan(MODEL, 2, layers_per_stage=v),
    ),
    ("split.model", "model", lambda v: pp.split_model_into_stages(v, 2)),
    ("split.num_stages", "num_stages", lambda v: pp.split_model_into_stages(MODEL, v)),
    ("split.stage_index", "stage_index", lambda v: pp.split_model_into_stages(MODEL, 2, stage_index=v)),
    (
        "split.layers_per_stage",
        "layers_per_stage",
        lambda v: pp.split_model_into_stages(MODEL, 2, layers_per_stage=v),
    ),
    (
        "split.patch_forwards",
        "patch_forwards",
        lambda v: pp.split_model_into_stages(MODEL, 2, patch_forwards=v),
    ),
    ("split_layer_ranges.layer_costs", "layer_costs", lambda v: split_layer_ranges(v, 1)),
    ("split_layer_ranges.num_stages", "num_stages", lambda v: split_layer_ranges([1.0, 2.0, 3.0], v)),
    ("patch.model", "model", lambda v: pp.patch_hf_model_for_pp(v)),
    ("patch.patch_inner_model", "patch_inner_model", lambda v: pp.patch_hf_model_for_pp(MODEL, v)),
    (
        "patch.patch_causal_lm_model",
        "patch_causal_lm_model",
        lambda v: pp.patch_hf_model_for_pp(MODEL, True, v),
    ),
    ("unpatch.model", "model", lambda v: pp.unpatch_hf_model_for_pp(v)),
    ("pp_mask_cache.model", "model", lambda v: pp.pp_mask_cache(v)),
    ("get_text_module.model", "model", lambda v: pp.get_text_module(v)),
    ("model_keeps_self_forward.model", "model", lambda v: pp.model_keeps_self_forward(v)),
    ("init_hf_model_buffers.model", "model", lambda v: pp.init_hf_model_buffers(v, "cpu")),
    ("inner.model_class_name", "model_class_name", lambda v: pp.create_pipeline_forward_inner(v)),
    ("inner.mask_cache", "mask_cache", lambda v: pp.create_pipeline_forward_inner(mask_cache=v)),
    ("pipeline_train_step.run", "run", lambda v: pp.pipeline_train_step(v, None, None)),
]


def _build(**overrides):
    kwargs = dict(rank=0, world_size=2, n_microbatches=2, loss_fn=lambda logits, target: logits.sum())
    return pp.build_pipeline(MODEL, **{**kwargs, **overrides})


def _check(argument: str, call, value) -> None:
    try:
        call(value)
    except (TypeError, ValueError) as exc:
        assert argument in str(exc), f"{type(exc).__name__} does not name {argument!r}: {exc}"
    finally:
        pp.unpatch_hf_model_for_pp(MODEL)  # an example that patched (valid flags) leaves nothing behind


_settings = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.parametrize(("argument", "call"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
@_settings
@given(value=JUNK)
def test_public_functions_name_the_bad_argument(argument, call, value):
    _check(argument, call, value)


@_settings
@given(value=NOT_A_DEVICE)
def test_init_buffers_names_a_bad_device(value):
    if isinstance(value, str) and value == "":
        value = "x"
    _check("device", lambda v: pp.init_hf_model_buffers(MODEL, v), value)


# build_pipeline needs a process group once its arguments are valid: only invalid ones are drawn.
BUILD_CASES = [
    ("rank", JUNK.filter(lambda v: not (type(v) is int and 0 <= v < 2))),
    ("world_size", JUNK.filter(lambda v: not (type(v) is int and v > 0))),
    ("n_microbatches", JUNK.filter(lambda v: not (type(v) is int and v > 0))),
    ("loss_fn", JUNK.filter(lambda v: not callable(v))),
    ("schedule", JUNK.filter(lambda v: v not in pp.SCHEDULES)),
    ("stages_per_rank", JUNK.filter(lambda v: v is not None and not (type(v) is int and v == 1))),
    ("device", NOT_A_DEVICE.filter(lambda v: v not in ("cpu",))),
]


@pytest.mark.parametrize(("argument", "values"), BUILD_CASES, ids=[c[0] for c in BUILD_CASES])
@settings(max_examples=15, deadline=None)
@given(data=st.data())
def test_build_pipeline_names_the_bad_argument(argument, values, data):
    value = data.draw(values)
    with pytest.raises((TypeError, ValueError), match=argument):
        functools.partial(_build, **{argument: value})()


def test_reported_examples():
    with pytest.raises(TypeError, match=r"num_stages must be an int, got '2'"):
        pp.get_pipeline_problems(MODEL, num_stages="2")
    with pytest.raises(TypeError, match=r"num_stages must be an int, got 2\.5"):
        pp.split_model_into_stages(MODEL, 2.5)
    for bad in (None, 3, "model"):
        with pytest.raises(TypeError, match=r"unpatch_hf_model_for_pp: model must be a torch\.nn\.Module"):
            pp.unpatch_hf_model_for_pp(bad)
    assert pp.get_pipeline_problems(MODEL, num_stages=0) == ["num_stages must be >= 1, got 0"]
