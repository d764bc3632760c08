"""The rope patch through decorators (`rebind.with_global`) and its behaviour contract (`liger_rope`)."""

import dataclasses
import functools
import inspect
import logging
import warnings

import pytest
import torch
import transformers
from transformers.models.llama import modeling_llama

# The drifted forwards below live in this module: they find the rope here, as transformers' find it in theirs.
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from am_kernels import patch_liger_kernel, unpatch_liger_kernel
from am_kernels._contract import parameter_name
from am_kernels.rebind import with_global

IDS = (torch.arange(32).reshape(2, 16) * 5) % 128
ATTENTION = "transformers.models.llama.modeling_llama.LlamaAttention.forward"


def _offset(x):
    return x + 1


def _uses_offset(x, *, scale=1):
    return scale * _offset(x)


def _closing(calls):
    """A functools.wraps decorator closing over the function, as transformers' deprecate_kwarg does."""

    def decorate(func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            calls.append(func.__qualname__)
            return func(*args, **kwargs)

        return wrapper

    return decorate


def _through_registry(func):
    """A decorator that finds the function through a dict: nothing in its closure can be swapped."""
    registry = {"func": func}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return registry["func"](*args, **kwargs)

    return wrapper


class _CallableWrapper:
    def __init__(self, func):
        functools.update_wrapper(self, func)

    def __call__(self, *args, **kwargs):
        return self.__wrapped__(*args, **kwargs)


def test_with_global_rebuilds_every_wraps_layer_around_the_copy():
    calls = []
    decorated = _closing(calls)(_closing(calls)(_uses_offset))
    copy = with_global(decorated, "_offset", lambda x: x * 10, "tests._uses_offset")

    assert copy(2, scale=3) == 60 and len(calls) == 2  # both decorator bodies still run, around the copy
    assert decorated(2, scale=3) == 9 and _offset(2) == 3  # the original and the module are untouched
    assert inspect.signature(copy) == inspect.signature(decorated)
    layers = [copy, copy.__wrapped__, copy.__wrapped__.__wrapped__]
    originals = [decorated, decorated.__wrapped__, _uses_offset]
    assert all(new is not old for new, old in zip(layers, originals))
    # Decorator layers keep their code; the innermost copy runs the same bytecode from its own code object,
    # so torch.compile's per-code cache never mixes it up with the original (whose globals differ).
    assert all(new.__code__ is old.__code__ for new, old in zip(layers[:-1], originals[:-1]))
    assert layers[-1].__code__ == _uses_offset.__code__ and layers[-1].__code__ is not _uses_offset.__code__
    assert inspect.unwrap(copy).__globals__["_uses_offset"] is _uses_offset  # other names read live


@pytest.mark.parametrize(
    ("wrap", "problem"),
    [
        (_through_registry, "does not keep the function it wraps"),
        (_CallableWrapper, "expected a Python function"),
    ],
)
def test_with_global_refuses_wrappers_it_cannot_rebuild(wrap, problem):
    with pytest.raises(RuntimeError, match=problem) as info:
        with_global(wrap(_uses_offset), "_offset", None, "tests._uses_offset")
    assert "tests._uses_offset" in str(info.value) and transformers.__version__ in str(info.value)


def test_decorated_attention_forward_gets_liger_rope_and_same_numbers(tiny, torch_ops, monkeypatch, kit):
    calls, ropes = [], []
    ops = dataclasses.replace(
        torch_ops, rotary_pos_emb=lambda *a: ropes.append(1) or torch_ops.rotary_pos_emb(*a)
    )
    # One more decorator on top of whatever the installed transformers has (5.24: deprecate_kwarg).
    monkeypatch.setattr(
        modeling_llama.LlamaAttention, "forward", _closing(calls)(modeling_llama.LlamaAttention.forward)
    )
    ref, model = tiny("llama"), tiny("llama")
    pristine = kit.instance_state(model)
    patch_liger_kernel(model, ops=ops, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False)
    try:
        calls.clear()  # the contract probe ran the decorated forward too
        with torch.no_grad():
            torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        assert len(ropes) == 2  # Liger's rope in both layers of the patched model
        assert len(calls) == 4  # the decorator still runs in the rebuilt copy (and for the reference)
        attn = model.model.layers[0].self_attn
        assert inspect.unwrap(attn.forward.__func__).__globals__["apply_rotary_pos_emb"].__am_patch__
    finally:
        unpatch_liger_kernel(model)
    kit.assert_same_state(pristine, kit.instance_state(model))


def _drop_rope_call(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    return hidden_states, None


def _rope_through_alias(
    self, hidden_states, position_embeddings=None, attention_mask=None, _rope=apply_rotary_pos_emb, **kwargs
):
    # Calls transformers' rope, but not through the module-level name: redirecting the global would miss it.
    cos, sin = position_embeddings
    q = k = torch.zeros_like(cos).unsqueeze(1)
    return _rope(q, k, cos, sin)[0], None


def _rope_on_other_tables(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    cos, sin = position_embeddings
    q = k = hidden_states.unsqueeze(1)
    return apply_rotary_pos_emb(q, k, cos.clone(), sin.clone())[0], None


@pytest.mark.parametrize(
    ("drifted", "problem"),
    [
        (_closing([])(_drop_rope_call), "no longer calls the module-level apply_rotary_pos_emb"),
        (_rope_through_alias, "no longer calls the module-level apply_rotary_pos_emb"),
        (_rope_on_other_tables, "other cos/sin"),
        (_through_registry(modeling_llama.LlamaAttention.forward), "does not keep the function it wraps"),
    ],
    ids=["decorated-no-rope", "rope-via-alias", "other-cos-sin", "registry-decorator"],
)
def test_rope_drift_is_refused_before_any_change(tiny, torch_ops, monkeypatch, kit, drifted, problem):
    model = tiny("llama")
    pristine = kit.instance_state(model)
    monkeypatch.setattr(modeling_llama.LlamaAttention, "forward", drifted)
    with pytest.raises(RuntimeError, match=problem) as info:
        patch_liger_kernel(model, ops=torch_ops)
    assert ATTENTION in str(info.value) and transformers.__version__ in str(info.value)
    kit.assert_same_state(pristine, kit.instance_state(model))


def test_fused_path_returns_the_cache_under_the_installed_name_without_deprecations(
    tiny, torch_ops, monkeypatch
):
    logged = []
    monkeypatch.setattr(logging.Logger, "warning_once", lambda self, msg, *a, **k: logged.append(str(msg)))
    ref, model = tiny("llama"), tiny("llama")
    model.train(), ref.train()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # deprecate_kwarg warns with FutureWarning
        patch_liger_kernel(model, ops=torch_ops)
        try:
            out, expected = model(IDS, labels=IDS, use_cache=True), ref(IDS, labels=IDS, use_cache=True)
        finally:
            unpatch_liger_kernel(model)
    field = parameter_name(type(out), "past_key_values")
    assert getattr(out, field).get_seq_length() == getattr(expected, field).get_seq_length() == IDS.shape[1]
    assert not [m for m in logged if "deprecated" in m], logged
