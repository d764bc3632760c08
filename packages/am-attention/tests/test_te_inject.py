from __future__ import annotations

import sys
import types
import warnings

import pytest
import torch
import transformers

import am_attention as A
from am_attention.reference import ReferenceDotProductAttention

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import ARCHS, build

REF = ReferenceDotProductAttention
S = 16  # > the sliding windows (5, 6) so sliding layers get real 4D masks


def _ids(batch=2, seq=S):
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 128, (batch, seq), generator=g)


def _loss_and_grads(model, **inputs):
    model.zero_grad()
    out = model(**inputs).logits
    out.float().pow(2).mean().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ARCHS)
def test_injected_model_matches_uninjected_logits_and_grads(arch):
    model = build(arch)
    ids = _ids()
    ref_out, ref_grads = _loss_and_grads(model, input_ids=ids)
    keys = list(model.state_dict())
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        assert model._te_attention_injected is True
        out, grads = _loss_and_grads(model, input_ids=ids)
        stats = A.get_te_attention_stats()
        assert list(model.state_dict()) == keys
        assert not any("attn_module" in n for n, _ in model.named_modules())
    # fp32 on CPU: the reference runs the same SDPA math with an equivalent mask -> 1e-5 is ample
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-4)
    assert stats["te_hits"] == 2 and stats["fallback_mask"] == 0, stats


def test_gemma3_scaling_and_mixed_layers_are_read():
    model = build("gemma3")
    params = [A.infer_attn_params(layer.self_attn) for layer in model.model.layers]
    assert params[0].window_size == (4, 0) and params[1].window_size == (-1, 0)
    assert params[0].softmax_scale == pytest.approx(24**-0.5)
    assert params[0].softmax_scale != pytest.approx(16**-0.5)


def test_padded_batch_falls_back_with_counted_reason_and_same_numbers():
    model = build("qwen2").eval()
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    ref = model(input_ids=ids, attention_mask=mask).logits
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        out = model(input_ids=ids, attention_mask=mask).logits
    stats = A.get_te_attention_stats()
    assert stats["fallback_mask"] == 2 and stats["te_hits"] == 0, stats
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_scale_mismatch_falls_back():
    model = build("llama").eval()
    ids = _ids()
    ref = model(input_ids=ids).logits
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        for layer in model.model.layers:
            layer.self_attn.scaling = 0.5  # changed after injection: the kernel's fixed scale is stale
        out = model(input_ids=ids).logits
        for layer in model.model.layers:
            layer.self_attn.scaling = 16**-0.5
    assert A.get_te_attention_stats()["fallback_scale_mismatch"] == 2
    assert not torch.allclose(out, ref)  # SDPA honoured the new scale


def test_undo_restores_everything_and_second_injection_is_noop():
    model = build("mistral")
    config = model.config
    before_cfg = dict(vars(config))
    before_attn = [dict(vars(layer.self_attn)) for layer in model.model.layers]
    h1 = A.inject_te_attention(model, dot_product_attention_cls=REF)
    h2 = A.inject_te_attention(model, dot_product_attention_cls=REF)
    assert h1 is h2 and model.config._attn_implementation == "te"
    # the model reads its own copy; the config object is unchanged
    assert config._attn_implementation == "sdpa"
    assert isinstance(model.model.layers[0].self_attn.attn_module, REF)
    assert A.remove_te_attention(model) is True
    assert A.remove_te_attention(model) is False
    assert model.config is config and vars(config) == before_cfg and config._attn_implementation == "sdpa"
    assert [dict(vars(layer.self_attn)) for layer in model.model.layers] == before_attn
    assert "_te_attention_injected" not in vars(model)


def test_plan_is_pure_and_explains_fallbacks():
    model = build("qwen2")

    class FusedAttention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv = torch.nn.Linear(8, 24)

    model.model.extra = FusedAttention()
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    plan = dict((name, (taken, reason)) for name, taken, reason in A.plan_te_attention(model))
    assert plan["model.layers.0.self_attn"] == (True, "causal")
    assert plan["model.extra"][0] is False and plan["model.extra"][1].startswith("layout")
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == before


def test_local_import_module_is_skipped_with_warning():
    src = types.ModuleType("fake_remote_modeling")
    src.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention
    sys.modules[src.__name__] = src
    try:

        class LocalAttention(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.q_proj = torch.nn.Linear(32, 32)
                self.k_proj = torch.nn.Linear(32, 32)
                self.v_proj = torch.nn.Linear(32, 32)
                self.num_heads, self.head_dim = 4, 8
                self.config = transformers.PretrainedConfig()

            def forward(self, x):
                return x

        LocalAttention.__module__ = src.__name__
        module = LocalAttention()
        with pytest.warns(UserWarning, match="local import"):
            assert A.inject_te_attention_into_module(module, dot_product_attention_cls=REF) is False
        assert "attn_module" not in vars(module)
    finally:
        del sys.modules[src.__name__]


def _per_document_logits(model, docs):
    return torch.cat([model(input_ids=d[None]).logits[0] for d in docs])


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_packed_position_ids_run_thd_and_match_per_document(arch):
    model = build(arch).eval()
    g = torch.Generator().manual_seed(3)
    lengths = [5, 8, 3]
    docs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    ref = _per_document_logits(model, docs)
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        A.reset_te_attention_stats()
        out = model(input_ids=ids, position_ids=position_ids, use_cache=False).logits[0]
    stats = A.get_te_attention_stats()
    assert stats["te_thd_hits"] == 2 and stats["fallback_mask"] == 0, stats
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_cu_seq_lens_kwargs_run_thd():
    model = build("llama").eval()
    lengths = [6, 10]
    g = torch.Generator().manual_seed(4)
    docs = [torch.randint(0, 128, (n,), generator=g) for n in lengths]
    ids = torch.cat(docs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu = torch.tensor([0, 6, 16], dtype=torch.int32)
    ref = _per_document_logits(model, docs)
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        out = model(
            input_ids=ids,
            position_ids=position_ids,
            use_cache=False,
            cu_seq_lens_q=cu,
            cu_seq_lens_k=cu,
            max_length_q=10,
            max_length_k=10,
        ).logits[0]
    assert A.get_te_attention_stats()["te_thd_hits"] == 2
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_indexed_mask_reaching_attention_runs_thd_with_padding():
    # am-packing passes the [B, S] indexed mask through to attention; emulate that at the attention call
    torch.manual_seed(0)
    model = build("qwen2").eval()
    attn = model.model.layers[0].self_attn
    A.inject_te_attention_into_module(attn, dot_product_attention_cls=REF)
    A.register_te_attention_backend()
    try:
        q = torch.randn(2, 4, 7, 16)
        k = torch.randn(2, 2, 7, 16)
        v = torch.randn(2, 2, 7, 16)
        indexed = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
        out, _ = A.te_attention_forward(attn, q, k, v, indexed, scaling=attn.scaling)
        assert A.get_te_attention_stats()["te_thd_hits"] == 1
        for b, spans in ((0, [(0, 3), (3, 5)]), (1, [(0, 7)])):
            for s0, s1 in spans:
                want = torch.nn.functional.scaled_dot_product_attention(
                    q[b : b + 1, :, s0:s1],
                    k[b : b + 1, :, s0:s1],
                    v[b : b + 1, :, s0:s1],
                    is_causal=True,
                    enable_gqa=True,
                ).transpose(1, 2)[0]
                torch.testing.assert_close(out[b, s0:s1], want, atol=1e-5, rtol=0)
        assert out[0, 5:].abs().max() == 0
    finally:
        A.remove_te_attention(model)
        A.unregister_te_attention_backend()


def test_repeat_kv_is_undone_for_gqa():
    model = build("qwen2").eval()
    attn = model.model.layers[0].self_attn
    A.inject_te_attention_into_module(attn, dot_product_attention_cls=REF)
    A.register_te_attention_backend()
    try:
        q, k, v = torch.randn(1, 4, 6, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
        out_native, _ = A.te_attention_forward(attn, q, k, v, None, scaling=attn.scaling)
        k_rep, v_rep = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        out_rep, _ = A.te_attention_forward(attn, q, k_rep, v_rep, None, scaling=attn.scaling)
        torch.testing.assert_close(out_rep, out_native)
        assert A.get_te_attention_stats()["te_hits"] == 2
    finally:
        A.remove_te_attention(model)
        A.unregister_te_attention_backend()


def test_other_models_are_unaffected_while_one_is_injected():
    injected, plain = build("llama").eval(), build("llama").eval()
    ids = _ids()
    ref = plain(input_ids=ids).logits
    with A.inject_te_attention(injected, dot_product_attention_cls=REF):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = plain(input_ids=ids).logits
        assert plain.config._attn_implementation == "sdpa"
        assert A.get_te_attention_stats()["fallback_not_injected"] == 0
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
