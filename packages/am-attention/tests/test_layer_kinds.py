"""Layers that differ from the plain causal self-attention: per-layer windows, attention sinks, extra logit
inputs, cross-attention, and a submodule whose contract does not hold. Each: injected == plain, or the plan
names why the layer is not taken (and it then keeps its own attention)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers

import am_attention as A
from am_attention.reference import ReferenceDotProductAttention as REF

S = 12  # > the window (4): sliding layers get a real band
TOL = 1e-5  # fp32 on CPU: the kernel and the plain forward differ only in summation order


def _model_class(name: str):
    """A transformers class these tests need; older 5.x minors lack some families, which then skip."""
    found = getattr(transformers, name, None)
    if found is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    return found


def _ids(batch: int = 2, seq: int = S, vocab: int = 96) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(1))


def _plan(model, **kw) -> dict[str, tuple[bool, str]]:
    return {name: (taken, reason) for name, taken, reason in A.plan_te_attention(model, **kw)}


def _compare(model, cls=REF, **inputs) -> tuple[float, dict[str, int]]:
    """Max |injected - plain| of the logits, and the dispatch counters of the injected forward."""
    with torch.no_grad():
        ref = model(**inputs).logits
        A.reset_te_attention_stats()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            handle = A.inject_te_attention(model, dot_product_attention_cls=cls)
        with handle:
            got = model(**inputs).logits
            stats = A.get_te_attention_stats()
    return (got - ref).abs().max().item(), stats


COMMON = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
)


def _exaone4() -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = _model_class("Exaone4Config")(
        **COMMON,
        num_hidden_layers=2,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"],
        attn_implementation="sdpa",
    )
    return _model_class("Exaone4ForCausalLM")(cfg).eval()


def test_full_layer_of_layer_types_gets_no_window():
    # Exaone 4 keeps config.sliding_window on every layer and passes it only where layer_types says sliding
    model = _exaone4()
    assert all(layer.self_attn.sliding_window == 4 for layer in model.model.layers)
    plan = _plan(model)
    assert plan["model.layers.0.self_attn"] == (True, "causal, sliding window 4")
    assert plan["model.layers.1.self_attn"] == (True, "causal")
    assert A.infer_attn_params(model.model.layers[1].self_attn).window_size == (-1, 0)
    diff, stats = _compare(model, input_ids=_ids())
    assert diff < TOL and stats["te_hits"] == 2, (diff, stats)


def _with_sinks(arch: str) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = dict(COMMON, num_hidden_layers=2, sliding_window=4, attn_implementation="eager")
    if arch == "gpt_oss":
        kw.update(
            num_local_experts=4, num_experts_per_tok=2, layer_types=["sliding_attention", "full_attention"]
        )
        model = _model_class("GptOssForCausalLM")(_model_class("GptOssConfig")(**kw))
    elif arch == "granite_swa":  # sinks as a post-attention LSE scaling: the same softmax denominator
        kw.update(layer_types=["full_attention", "sliding_attention"])
        model = _model_class("GraniteSWAForCausalLM")(_model_class("GraniteSWAConfig")(**kw))
    else:
        raise ValueError(arch)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)  # large enough to matter in every row
    return model.eval()


@pytest.mark.parametrize("arch", ["gpt_oss", "granite_swa"])
def test_learnable_sinks_run_in_the_kernel(arch):
    model = _with_sinks(arch)
    plan = _plan(model, dot_product_attention_cls=REF)
    assert all(taken and reason.endswith("learnable sinks (sinks)") for taken, reason in plan.values()), plan
    diff, stats = _compare(model, input_ids=_ids())
    assert diff < TOL and stats["te_hits"] == 2 and not stats["fallback_sinks"], (diff, stats)
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        attn = model.model.layers[0].self_attn
        assert attn.attn_module.softmax_offset is attn.sinks  # trained and saved with the module


def test_sinks_fallback_on_a_padded_batch_keeps_them():
    # a padding mask is not causal: SDPA runs, and transformers' SDPA has no sinks, so the fallback adds them
    model = _with_sinks("gpt_oss")
    ids = _ids()
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
        with A.inject_te_attention(model, dot_product_attention_cls=REF):
            got = model(input_ids=ids, attention_mask=mask).logits
            stats = A.get_te_attention_stats()
    assert stats["fallback_mask"] >= 1, stats
    assert (got - ref)[mask.bool()].abs().max().item() < TOL


class _NoSinksKernel(REF):
    """A kernel class without TE's softmax_type: it cannot take learnable sinks."""

    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", window_size=None, softmax_scale=None):  # fmt: skip
        super().__init__(num_attention_heads, kv_channels, num_gqa_groups, attention_dropout, qkv_format,
                         attn_mask_type, window_size, softmax_scale)  # fmt: skip


def test_sinks_layers_keep_their_attention_when_the_kernel_cannot_take_them():
    torch.manual_seed(0)
    cfg = _model_class("MiMoV2FlashConfig")(
        **COMMON,
        v_head_dim=8,
        moe_intermediate_size=16,
        n_routed_experts=4,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        sliding_window=4,
        layer_types=["full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "dense"],
        attn_implementation="eager",
    )
    model = _model_class("MiMoV2FlashForCausalLM")(cfg).eval()
    with torch.no_grad():
        model.model.layers[1].self_attn.sinks.normal_(0.0, 2.0)
    plan = _plan(model, dot_product_attention_cls=_NoSinksKernel)
    assert plan["model.layers.0.self_attn"] == (True, "causal")  # no sinks on MiMo's full layers
    taken, reason = plan["model.layers.1.self_attn"]
    assert not taken and reason.startswith("sinks: ") and "softmax_type" in reason, reason
    diff, stats = _compare(model, cls=_NoSinksKernel, input_ids=_ids())
    assert diff < TOL and stats["te_hits"] == 1, (diff, stats)
    with pytest.warns(UserWarning, match=r"skips model\.layers\.1\.self_attn: sinks: _NoSinksKernel"):
        handle = A.inject_te_attention(model, dot_product_attention_cls=_NoSinksKernel)
    with handle:
        # an eager model: the layer not taken and the mask builders keep eager, as before injection
        assert model.model.layers[1].self_attn.config._attn_implementation == "eager"
        assert model.model.config._attn_implementation == "eager"
        assert model.model.layers[0].self_attn.config._attn_implementation == "te"


def test_logit_bias_passed_to_the_attention_function_is_not_taken():
    torch.manual_seed(0)
    cfg = _model_class("InklingTextConfig")(**COMMON, num_hidden_layers=2, attn_implementation="sdpa")
    model = _model_class("InklingForCausalLM")(cfg).eval()
    plan = _plan(model)
    assert plan and all(not t and r.startswith("inputs: ") and "position_bias" in r for t, r in plan.values())
    diff, stats = _compare(model, input_ids=_ids())
    assert diff < TOL and not stats["te_hits"], (diff, stats)


def test_causal_mask_wins_over_a_non_causal_flag_in_an_eager_model():
    # an eager-built decoder that flags its self-attention non-causal and relies on the causal mask
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**COMMON, num_hidden_layers=2, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.model.layers[1].self_attn.is_causal = False
    diff, stats = _compare(model, input_ids=_ids())
    assert diff < TOL and stats["te_hits"] == 2, (diff, stats)
    # a packed row (two documents by position_ids) runs in THD, causal as the mask says: each document alone
    ids = _ids()
    packed = torch.cat([torch.arange(5), torch.arange(S - 5)])[None].expand(2, -1)
    with torch.no_grad():
        alone = torch.cat([model(input_ids=ids[:, :5]).logits, model(input_ids=ids[:, 5:]).logits], dim=1)
        with A.inject_te_attention(model, dot_product_attention_cls=REF):
            got = model(input_ids=ids, position_ids=packed).logits
            assert A.get_te_attention_stats()["te_thd_hits"] == 2
    assert (got - alone).abs().max().item() < TOL


def test_non_causal_attention_that_may_be_cross_attention_is_not_taken():
    torch.manual_seed(0)
    cfg = transformers.BigBirdPegasusConfig(
        vocab_size=96, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        attention_type="original_full",
    )  # fmt: skip
    model = transformers.BigBirdPegasusForCausalLM(cfg).eval()
    plan = _plan(model)
    assert {"model.decoder.layers.0.self_attn", "model.decoder.layers.0.encoder_attn"} <= set(plan)
    assert all(not t and r.startswith("cross-attention: ") for t, r in plan.values()), plan
    diff, stats = _compare(model, input_ids=_ids())
    assert diff < TOL and not stats["te_hits"], (diff, stats)


def test_vlm_vision_attention_with_a_broken_contract_is_skipped_not_blocking():
    torch.manual_seed(0)
    text = dict(
        COMMON, num_hidden_layers=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"]
    )
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)  # fmt: skip
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    cfg._attn_implementation = "sdpa"
    model = transformers.Gemma3ForConditionalGeneration(cfg).eval()
    plan = _plan(model)
    vision_rows = {n: r for n, r in plan.items() if "vision_tower" in n}
    text_rows = {n: r for n, r in plan.items() if "language_model" in n}
    assert vision_rows and not any(t for t, _ in vision_rows.values()), plan
    assert any(r.startswith("refused: ") for _, r in vision_rows.values()), plan  # the broken contract
    assert len(text_rows) == 2 and all(t for t, _ in text_rows.values()), plan
    with pytest.warns(UserWarning, match="skips .*vision_tower.*refused"):
        handle = A.inject_te_attention(model, dot_product_attention_cls=REF)
    with handle:
        assert sorted(handle.taken) == sorted(text_rows)
    diff, stats = _compare(model, input_ids=_ids())
    assert diff < TOL and stats["te_hits"] == 2, (diff, stats)


@pytest.mark.parametrize("softmax_type", ["learnable", "off-by-one"])
def test_reference_kernel_sinks_match_softmax_over_logits_and_sink(softmax_type):
    torch.manual_seed(0)
    b, s, h, d = 2, 7, 4, 8
    q, k, v = (torch.randn(b, s, h, d) for _ in range(3))
    kernel = REF(h, d, qkv_format="bshd", window_size=(2, 0), softmax_type=softmax_type)
    if softmax_type == "learnable":
        with torch.no_grad():
            kernel.softmax_offset.normal_(0.0, 2.0)
    sink = kernel.softmax_offset.detach()
    logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * d**-0.5
    i = torch.arange(s)
    band = (i[None, :] <= i[:, None]) & (i[None, :] >= i[:, None] - 2)
    logits = logits.masked_fill(~band, float("-inf"))
    full = torch.cat([logits, sink.view(1, h, 1, 1).expand(b, h, s, 1)], dim=-1).softmax(-1)[..., :-1]
    want = torch.einsum("bhqk,bkhd->bqhd", full, v).flatten(2)
    assert (kernel(q, k, v) - want).abs().max().item() < TOL
    cu = torch.tensor([0, s], dtype=torch.int32)
    thd = kernel(
        q[0], k[0], v[0], qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, attn_mask_type="padding_causal"
    )
    assert (thd - want[0]).abs().max().item() < TOL


def test_bad_softmax_type_and_kernel_class_are_named():
    with pytest.raises(ValueError, match="softmax_type must be one of"):
        REF(4, 8, softmax_type="sink")
    with pytest.raises(TypeError, match="dot_product_attention_cls must be a class or callable, got 3"):
        A.plan_te_attention(_exaone4(), dot_product_attention_cls=3)
