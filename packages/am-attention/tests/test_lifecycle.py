"""What an injection owns and for how long: shared configs, single modules, copies, pickles, garbage, failures."""

from __future__ import annotations

import copy
import gc
import math
import pickle
import sys
import weakref

import pytest
import torch
import transformers
from transformers import modeling_utils

import am_attention as A
from am_attention import te_backend, te_inject
from am_attention.te_params import AttnParams

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import COMMON, build

REF = A.ReferenceDotProductAttention


def _ids(batch=2, seq=12):
    return torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(1))


def _registered() -> bool:
    return "te" in modeling_utils.AttentionInterface._global_mapping


def _snapshot(model):
    return {name: dict(vars(m)) for name, m in model.named_modules()}


def test_models_sharing_a_config_are_injected_independently():
    config = transformers.LlamaConfig(**COMMON)
    torch.manual_seed(0)
    a, b = transformers.LlamaForCausalLM(config).eval(), transformers.LlamaForCausalLM(config).eval()
    ids = _ids()
    ref_a, ref_b = a(ids).logits, b(ids).logits
    with A.inject_te_attention(a, dot_product_attention_cls=REF):
        assert a.config._attn_implementation == "te" and a.config is not config
        assert b.config is config and config._attn_implementation == "sdpa"
        assert all(layer.self_attn.config is config for layer in b.model.layers)
        torch.testing.assert_close(b(ids).logits, ref_b, atol=0, rtol=0)
        assert A.get_te_attention_stats()["te_hits"] == 0  # b never reached the "te" backend
        with A.inject_te_attention(b, dot_product_attention_cls=REF):
            assert b.config._attn_implementation == "te" and b.config is not a.config
        assert b.config is config  # b undone, a still injected
        torch.testing.assert_close(a(ids).logits, ref_a, atol=1e-5, rtol=0)
        assert A.get_te_attention_stats()["te_hits"] == 2
    assert a.config is config and all(layer.self_attn.config is config for layer in a.model.layers)
    assert config._attn_implementation == "sdpa"


def test_module_injection_runs_the_kernel_in_that_module_only():
    model = build("llama").eval()
    ids = _ids()
    ref = model(ids).logits
    attn = model.model.layers[0].self_attn
    before = _snapshot(model)
    assert A.inject_te_attention_into_module(attn, dot_product_attention_cls=REF) is True
    assert A.inject_te_attention_into_module(attn, dot_product_attention_cls=REF) is True  # idempotent
    assert attn.config._attn_implementation == "te" and model.config._attn_implementation == "sdpa"
    out = model(ids).logits
    stats = A.get_te_attention_stats()
    assert stats["te_hits"] == 1 and stats["fallback_not_injected"] == 0, stats  # True = it runs the kernel
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    assert A.remove_te_attention(attn) is True
    assert _snapshot(model) == before and not _registered()


def test_infer_attn_params_reads_the_layout_of_any_module():
    class Plain(torch.nn.Module):  # q/k/v projections, computes attention itself, no config
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (torch.nn.Linear(32, n) for n in (32, 16, 16))
            self.num_heads = 4

    module = Plain()
    assert A.infer_attn_params(module) == AttnParams(4, 2, 8, (-1, 0), 1 / math.sqrt(8))
    assert A.inject_te_attention_into_module(module, dot_product_attention_cls=REF) is False
    assert "attn_module" not in vars(module)


def test_dropped_model_is_freed_and_unregisters_te():
    model = build("qwen2")
    A.inject_te_attention(model, dot_product_attention_cls=REF)  # handle dropped too
    assert _registered()
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None and not _registered()
    assert te_backend.live_leases() == 0


def test_injection_failing_half_way_changes_nothing(monkeypatch):
    model = build("qwen2")
    before = _snapshot(model)
    registry = dict(modeling_utils.AttentionInterface._global_mapping)
    original = te_inject._InstanceDictPatch._set
    calls = []

    def flaky(self, value):
        calls.append(self.attr)
        if len(calls) == 5:  # the second layer's kernel
            raise RuntimeError("simulated failure while setting")
        original(self, value)

    monkeypatch.setattr(te_inject._InstanceDictPatch, "_set", flaky)
    with pytest.raises(RuntimeError, match="simulated failure"):
        A.inject_te_attention(model, dot_product_attention_cls=REF)
    assert _snapshot(model) == before
    assert dict(modeling_utils.AttentionInterface._global_mapping) == registry and not _registered()
    assert te_backend.live_leases() == 0


def _halve(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)


def test_deepcopy_of_injected_model_is_first_class():
    model = build("qwen2").eval()
    ids = _ids()
    plain_copy = copy.deepcopy(model)
    _halve(plain_copy)
    want = plain_copy(ids).logits
    handle = A.inject_te_attention(model, dot_product_attention_cls=REF)
    clone = copy.deepcopy(model)
    _halve(clone)
    assert te_backend.live_leases() == 4  # two modules each
    clone_handle = A.inject_te_attention(clone, dot_product_attention_cls=REF)
    assert clone_handle is not handle and clone_handle.applied  # the copy's own handle
    assert A.remove_te_attention(model) is True
    assert _registered()  # the copy still uses it
    A.reset_te_attention_stats()
    got = clone(ids).logits  # its own weights, its own kernels
    assert A.get_te_attention_stats()["te_hits"] == 2
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert A.remove_te_attention(clone) is True and A.remove_te_attention(clone) is False
    assert not _registered() and te_backend.live_leases() == 0
    assert all("attn_module" not in vars(m) for m in clone.modules())
    assert (
        clone.config._attn_implementation == "sdpa" and clone.model.layers[0].self_attn.config is clone.config
    )
    again = A.inject_te_attention(clone, dot_product_attention_cls=REF)  # no "flagged ... no handle"
    again.revert()


def test_pipeline_stage_copied_from_injected_model_can_be_removed():
    model = build("mistral").eval()
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        stage = copy.deepcopy(model.model.layers[1])  # a stage: a deepcopy of a subset
    assert _registered()  # the stage's module still runs the kernel
    x = torch.randn(1, 12, 64)
    pos = torch.arange(12)[None]
    emb = model.model.rotary_emb(x, pos)
    i = torch.arange(12)
    mask = ((i[None] <= i[:, None]) & (i[None] > i[:, None] - 6))[None, None]  # sliding window 6
    kw = dict(attention_mask=mask, position_embeddings=emb, position_ids=pos)
    want = model.model.layers[1](x, **kw)
    got = stage(x, **kw)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert A.get_te_attention_stats()["te_hits"] == 1
    handle = A.inject_te_attention(stage, dot_product_attention_cls=REF)  # adopts what the copy carries
    assert handle.taken == ["self_attn"] and A.inject_te_attention(stage) is handle
    assert A.remove_te_attention(stage) is True
    assert (
        "attn_module" not in vars(stage.self_attn) and stage.self_attn.config._attn_implementation == "sdpa"
    )
    assert not _registered()


def test_pickled_injected_model_loads_working_and_removable():
    model = build("llama").eval()
    ids = _ids()
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        want = model(ids).logits
        loaded = pickle.loads(pickle.dumps(model))
    assert _registered() and loaded.config._attn_implementation == "te"
    A.reset_te_attention_stats()
    torch.testing.assert_close(loaded(ids).logits, want, atol=1e-6, rtol=0)
    assert A.get_te_attention_stats()["te_hits"] == 2
    assert A.remove_te_attention(loaded) is True and not _registered()


def test_model_handle_covers_modules_injected_before():
    model = build("llama")
    before = _snapshot(model)
    assert A.inject_te_attention_into_module(model.model.layers[0].self_attn, dot_product_attention_cls=REF)
    handle = A.inject_te_attention(model, dot_product_attention_cls=REF)
    assert handle.taken == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    handle.revert()
    assert _snapshot(model) == before and not _registered() and te_backend.live_leases() == 0
