"""Wrong inputs to every public function: a ValueError/TypeError naming the argument and the value, never noise."""

import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.attention import SDPBackend

import am_kernels
from am_kernels import (
    LigerOps,
    assert_same_signature,
    get_liger_kernel_patch,
    get_patch_report,
    get_sdpa_backends,
    patch_liger_kernel,
    patch_sdpa_backends,
    unpatch_liger_kernel,
    unpatch_sdpa_backends,
)


class _WithConfig(torch.nn.Module):
    def __init__(self, model_type):
        super().__init__()
        self.config = types.SimpleNamespace(model_type=model_type)

    def forward(self, x):
        return x


def _no_forward(x, *, y=1):
    return x


# Sampled objects are shared between examples: anything a call accepts is undone after it.
WRONG = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.binary(max_size=3),
    st.lists(st.integers() | st.text(max_size=3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.sampled_from(
        [
            object(),
            torch.nn.Linear(2, 2),
            torch.zeros(2),
            SDPBackend.MATH,
            [SDPBackend.MATH, "math"],
            types.SimpleNamespace(config=None),
            types.SimpleNamespace(forward=5, config=types.SimpleNamespace(model_type="llama")),
            _WithConfig(3),
            _WithConfig("gpt2"),
            _no_forward,
            len,
            int,
            type("Forwardless", (), {}),
        ]
    ),
)
FIXTURES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _names_value(message, value):
    # The value itself, or for a container the offending entry (`backends[1] is 'math' (str)`).
    candidates = [value, *value] if isinstance(value, (list, tuple, dict)) else [value]
    return any(type(v).__name__ in message or repr(v)[:40] in message for v in candidates)


def _call(func, arg, value, *, refuse, also=()):
    """Run func(); a refusal (required when `refuse`) must be a ValueError/TypeError naming `arg` and `value`."""
    try:
        func()
        assert not refuse, f"{arg}={value!r} was accepted"
    except also:
        return None
    except (TypeError, ValueError) as exc:
        message = str(exc)
        assert arg in message and _names_value(message, value), f"{type(exc).__name__}: {message}"
    except Exception as exc:  # anything else is noise
        pytest.fail(f"{arg}={value!r}: {type(exc).__name__}: {exc}")


LIGER_FLAGS = ["rope", "rms_norm", "swiglu", "cross_entropy", "fused_linear_cross_entropy"]


@FIXTURES
@given(arg=st.sampled_from(["model", "ops", *LIGER_FLAGS]), value=WRONG)
def test_patch_liger_kernel_refuses_wrong_arguments_by_name(tiny, torch_ops, kit, arg, value):
    model = tiny("llama")
    pristine = kit.instance_state(model)
    kwargs = {"ops": torch_ops, arg: value}
    target = value if arg == "model" else model
    if arg == "model":
        kwargs.pop("model")
    try:
        refuse = {
            "model": not isinstance(value, torch.nn.Module) or not hasattr(value, "config"),
            "ops": not isinstance(value, LigerOps) and value is not None,
            "cross_entropy": not isinstance(value, bool),
            "fused_linear_cross_entropy": not isinstance(value, bool),
        }.get(
            arg, not isinstance(value, bool) and value is not None
        )  # rope, rms_norm, swiglu: None = where exact
        _call(lambda: patch_liger_kernel(target, **kwargs), arg, value, refuse=refuse)
    finally:
        unpatch_liger_kernel(target)
    kit.assert_same_state(pristine, kit.instance_state(model))


@FIXTURES
@given(value=WRONG)
def test_patch_sdpa_backends_refuses_wrong_backends_and_objects_by_name(value):
    module = torch.nn.Linear(2, 2)
    try:
        valid = value is None or (
            isinstance(value, list) and value and all(isinstance(b, SDPBackend) for b in value)
        )
        _call(lambda: patch_sdpa_backends(module, value), "backends", value, refuse=not valid)
    finally:
        unpatch_sdpa_backends(module)
    assert "forward" not in vars(module)
    try:
        refuse = not callable(getattr(value, "forward", None))
        _call(lambda: patch_sdpa_backends(value, [SDPBackend.MATH]), "obj", value, refuse=refuse)
    finally:
        unpatch_sdpa_backends(value)
    assert get_sdpa_backends(value) is None


@FIXTURES
@given(value=WRONG)
def test_lookups_and_undos_accept_anything(value):
    assert get_sdpa_backends(value) is None
    assert get_liger_kernel_patch(value) is None
    assert unpatch_sdpa_backends(value) is value
    assert unpatch_liger_kernel(value) is value
    assert not get_patch_report(value)


@FIXTURES
@given(arg=st.sampled_from(["original", "patched"]), value=WRONG)
def test_assert_same_signature_names_an_unreadable_callable(arg, value):
    pair = {"original": _no_forward, "patched": _no_forward, arg: value}
    # Readable but different signatures are the documented AssertionError.
    _call(
        lambda: assert_same_signature(**pair), arg, value, refuse=not callable(value), also=(AssertionError,)
    )


@FIXTURES
@given(
    field=st.sampled_from(["rms_norm", "swiglu", "rotary_pos_emb", "cross_entropy", "source"]), value=WRONG
)
def test_liger_ops_fields_are_checked(torch_ops, field, value):
    fields = {f: getattr(torch_ops, f) for f in LigerOps.__dataclass_fields__}
    refuse = not isinstance(value, str) if field == "source" else not callable(value)
    _call(lambda: LigerOps(**{**fields, field: value}), f"LigerOps.{field}", value, refuse=refuse)


def test_every_public_function_is_covered():
    covered = {
        "assert_same_signature",
        "get_liger_kernel_patch",
        "get_patch_report",
        "get_sdpa_backends",
        "patch_liger_kernel",
        "patch_sdpa_backends",
        "unpatch_liger_kernel",
        "unpatch_sdpa_backends",
        "LigerOps",
    }
    # Functions without arguments need no input checks.
    no_arguments = {"load_liger_ops", "supported_model_types"}
    public = {n for n in am_kernels.__all__ if callable(getattr(am_kernels, n)) and not n.startswith("_")}
    data_types = {"LigerKernelPatch", "LigerPlan", "PatchReport", "PatchedModule"}
    assert public - data_types - no_arguments <= covered, public - data_types - no_arguments - covered
