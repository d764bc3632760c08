"""The attention-forward contract is a behaviour probe: a forward is judged by what reaches the attention interface.

Each broken forward below names everything a source or bytecode reader would look for
(ALL_ATTENTION_FUNCTIONS, ``**kwargs`` unpacked into a call, "sliding_window"), so only calling it tells.
"""

from __future__ import annotations

import functools
import inspect
import sys

import pytest
import torch
import transformers
from transformers import modeling_utils

import am_attention as A
from am_attention import te_plan

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import ARCHS, COMMON, build

REF = A.ReferenceDotProductAttention


def _qkv(self, hidden_states):
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    return tuple(
        p(hidden_states).view(shape).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj)
    )


def _out(self, attn_output, hidden_states):
    return self.o_proj(attn_output.reshape(*hidden_states.shape[:-1], -1)), None


def _log(**kwargs):
    return sorted(kwargs)


def _drops_kwargs(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    _log(**kwargs)  # **kwargs unpacked into a call, just not into the attention interface's
    interface = modeling_utils.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    q, k, v = _qkv(self, hidden_states)
    window = getattr(self, "sliding_window", None)
    out, _ = interface(self, q, k, v, attention_mask, scaling=self.scaling, sliding_window=window)
    return _out(self, out, hidden_states)


def _drops_window(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    _ = getattr(self.config, "sliding_window", None)  # read, never passed on
    interface = modeling_utils.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    q, k, v = _qkv(self, hidden_states)
    out, _ = interface(self, q, k, v, attention_mask, scaling=self.scaling, **kwargs)
    return _out(self, out, hidden_states)


def _wrong_window(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    interface = modeling_utils.ALL_ATTENTION_FUNCTIONS[self.config._attn_implementation]
    q, k, v = _qkv(self, hidden_states)
    window = self.config.sliding_window + 1
    out, _ = interface(self, q, k, v, attention_mask, scaling=self.scaling, sliding_window=window, **kwargs)
    return _out(self, out, hidden_states)


def _computes_attention_itself(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    if self.config._attn_implementation not in modeling_utils.ALL_ATTENTION_FUNCTIONS:
        raise KeyError(self.config._attn_implementation)
    q, k, v = _qkv(self, hidden_states)
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    return _out(self, out.transpose(1, 2), hidden_states)


def _fails_before_dispatch(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    raise ValueError("this forward wants inputs the probe cannot make")


def _renaming_decorator(forward):
    """Like transformers' deprecate_kwarg: a functools.wraps wrapper that renames a keyword and calls through."""

    @functools.wraps(forward)
    def wrapper(self, *args, **kwargs):
        if "legacy_cache" in kwargs:
            kwargs["cache"] = kwargs.pop("legacy_cache")
        return forward(self, *args, **kwargs)

    return wrapper


def _attention_class(model):
    return type(model.model.layers[0].self_attn)


def _plan(model):
    return {name: (taken, reason) for name, taken, reason in A.plan_te_attention(model)}


@pytest.mark.parametrize(
    "arch, forward, problem",
    [
        ("qwen2", _drops_kwargs, r"no longer passes \*\*kwargs on to the attention interface"),
        ("mistral", _drops_window, "has a sliding window but no longer passes sliding_window"),
        (
            "mistral",
            _wrong_window,
            "passes sliding_window=7 to the attention interface, but the layer's window is 6",
        ),
    ],
)
def test_forward_that_drops_what_the_backend_needs_is_refused(monkeypatch, arch, forward, problem):
    model = build(arch)
    cls = _attention_class(model)
    monkeypatch.setattr(cls, "forward", forward)
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    message = rf"{cls.__name__}\.forward: {problem}.*installed transformers {transformers.__version__}"
    with pytest.raises(RuntimeError, match=message):
        A.inject_te_attention(model, dot_product_attention_cls=REF)
    with pytest.raises(RuntimeError, match=message):
        A.inject_te_attention_into_module(model.model.layers[0].self_attn, dot_product_attention_cls=REF)
    taken, reason = _plan(model)["model.layers.0.self_attn"]
    assert not taken and reason.startswith("refused: ") and cls.__name__ in reason, reason
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == before
    assert not A.te_backend.is_te_attention_backend_registered()


def test_forward_that_computes_attention_itself_keeps_sdpa_with_a_reason(monkeypatch):
    model = build("qwen2").eval()
    cls = _attention_class(model)
    monkeypatch.setattr(cls, "forward", _computes_attention_itself)
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    ref = model(input_ids=ids).logits
    taken, reason = _plan(model)["model.layers.0.self_attn"]
    assert not taken
    assert reason == (
        f"dispatch: {cls.__module__}.{cls.__qualname__}.forward does not dispatch through transformers' "
        f"attention interface (installed transformers {transformers.__version__})"
    )
    with pytest.warns(UserWarning, match=rf"{cls.__name__}\.forward does not dispatch"):
        handle = A.inject_te_attention(model, dot_product_attention_cls=REF)
    with handle:
        assert handle.taken == [] and model.config._attn_implementation == "sdpa"
        out = model(input_ids=ids).logits
    assert A.get_te_attention_stats()["te_hits"] == 0
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_forward_that_fails_on_the_probe_is_refused_with_the_exception(monkeypatch):
    model = build("llama")
    cls = _attention_class(model)
    monkeypatch.setattr(cls, "forward", _fails_before_dispatch)
    taken, reason = _plan(model)["model.layers.1.self_attn"]
    assert not taken
    assert reason.startswith(f"dispatch: {cls.__module__}.{cls.__qualname__}.forward failed on a probe input")
    assert "(ValueError: this forward wants inputs the probe cannot make)" in reason
    assert transformers.__version__ in reason
    with pytest.warns(UserWarning, match="failed on a probe input"):
        assert not A.inject_te_attention_into_module(
            model.model.layers[0].self_attn, dot_product_attention_cls=REF
        )
    assert "attn_module" not in vars(model.model.layers[0].self_attn)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_decorated_forward_is_accepted_and_exact(monkeypatch, arch):
    model = build(arch)
    cls = _attention_class(model)
    monkeypatch.setattr(cls, "forward", _renaming_decorator(cls.forward))
    assert inspect.unwrap(cls.forward) is not cls.forward
    assert all(taken for taken, _ in _plan(model).values())
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    model.zero_grad()
    ref = model(input_ids=ids).logits
    ref.pow(2).mean().backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with A.inject_te_attention(model, dot_product_attention_cls=REF) as handle:
        assert len(handle.taken) == 2
        out = model(input_ids=ids).logits
        out.pow(2).mean().backward()
    assert A.get_te_attention_stats()["te_hits"] == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-5, rtol=1e-4)


def test_probe_runs_once_per_class_and_window_and_changes_nothing(monkeypatch):
    calls = []
    probe = te_plan.check_dispatch
    monkeypatch.setattr(te_plan, "check_dispatch", lambda m, p: calls.append(type(m)) or probe(m, p))
    monkeypatch.setattr(te_plan, "_VERDICTS", {})
    registry = dict(modeling_utils.AttentionInterface._global_mapping)
    llama = build("llama", num_hidden_layers=3)
    assert [t for t, _ in _plan(llama).values()] == [True] * 3
    assert _plan(llama) and len(calls) == 1  # a second plan reuses the verdict
    gemma3 = build("gemma3")  # one sliding and one full layer: two windows, two probes
    assert all(t for t, _ in _plan(gemma3).values())
    assert len(calls) == 3
    assert dict(modeling_utils.AttentionInterface._global_mapping) == registry


@pytest.mark.parametrize("arch", ARCHS)
def test_meta_models_are_probed_on_meta_tensors(arch):
    with torch.device("meta"):
        model = build(arch)
    plan = _plan(model)
    assert plan and all(taken for taken, _ in plan.values()), plan


def test_bfloat16_model_is_probed_in_its_dtype():
    config = transformers.LlamaConfig(**COMMON)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    assert all(taken for taken, _ in _plan(model).values())
