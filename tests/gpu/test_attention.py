"""am-attention on GPU: the real transformer-engine DotProductAttention against the SDPA reference.

With transformer-engine installed (`import transformer_engine.pytorch` succeeds) each case compares TE
with `ReferenceDotProductAttention` in bf16; without it the reference kernel is checked against fp32
math on the GPU instead and every test says so with a warning.
"""

from __future__ import annotations

import importlib
import warnings

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

import am_attention as A  # noqa: E402

try:
    te = importlib.import_module("transformer_engine.pytorch")
    KERNEL = te.DotProductAttention
except ImportError as exc:  # the [te] extra is optional: fall back to the reference and say so
    te = None
    KERNEL = None
    TE_MISSING = str(exc)

DEV = torch.device("cuda")
# bf16 has 8 mantissa bits; attention outputs are convex combinations of V (|V| ~ 1): 2e-2 covers
# accumulation-order differences between flash/cuDNN kernels and torch SDPA.
ATOL, RTOL = 2e-2, 2e-2


def _kernel(**kw):
    if KERNEL is None:
        warnings.warn(
            f"transformer-engine not importable ({TE_MISSING}); testing the reference kernel", stacklevel=2
        )
        return None
    return KERNEL(**kw).to(DEV)


def _check(ctor, q, k, v, **call):
    # yardstick: the reference kernel in fp32 on the same bf16 inputs
    want = A.ReferenceDotProductAttention(**ctor)(q.float(), k.float(), v.float(), **call)
    kern = _kernel(**ctor)
    got = (kern if kern is not None else A.ReferenceDotProductAttention(**ctor))(q, k, v, **call)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, atol=ATOL, rtol=RTOL)


def _qkv(shape_q, shape_kv):
    g = torch.Generator(device=DEV).manual_seed(0)
    mk = lambda s: torch.randn(*s, generator=g, device=DEV, dtype=torch.bfloat16)  # noqa: E731
    return mk(shape_q), mk(shape_kv), mk(shape_kv)


@pytest.mark.parametrize("window", [(-1, 0), (255, 0)], ids=["causal", "sliding256"])
@pytest.mark.parametrize("kv_heads", [16, 4], ids=["mha", "gqa"])
def test_bshd_causal_sliding_gqa(window, kv_heads):
    q, k, v = _qkv((2, 1024, 16, 128), (2, 1024, kv_heads, 128))
    ctor = dict(
        num_attention_heads=16,
        kv_channels=128,
        num_gqa_groups=kv_heads,
        qkv_format="bshd",
        attn_mask_type="causal",
        window_size=window,
        softmax_scale=128**-0.5,
    )
    _check(ctor, q, k, v, qkv_format="bshd", attn_mask_type="causal", window_size=window)


@pytest.mark.parametrize("window", [(-1, 0), (127, 0)], ids=["causal", "sliding128"])
def test_thd_packed(window):
    lengths = [300, 700, 24]
    t = sum(lengths)
    q, k, v = _qkv((t, 16, 128), (t, 4, 128))
    cu = torch.tensor([0, 300, 1000, 1024], dtype=torch.int32, device=DEV)
    ctor = dict(
        num_attention_heads=16,
        kv_channels=128,
        num_gqa_groups=4,
        qkv_format="thd",
        attn_mask_type="padding_causal",
        window_size=window,
        softmax_scale=128**-0.5,
    )
    _check(
        ctor,
        q,
        k,
        v,
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=700,
        max_seqlen_kv=700,
        attn_mask_type="padding_causal",
        window_size=window,
    )


def test_injected_hf_model_matches_sdpa_with_default_kernel():
    transformers = pytest.importorskip("transformers")
    from am_cli.tiny_models import build_config

    cfg = build_config(  # am-cli's built-in mistral at GPU-test size
        "mistral",
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1024,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=64,
        sliding_window=64,
        attn_implementation="sdpa",
    )
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).to(DEV, torch.bfloat16).eval()
    ids = torch.randint(0, 256, (2, 256), device=DEV)
    with torch.no_grad():
        want = model(ids).logits.float()
        cls = KERNEL or A.ReferenceDotProductAttention
        if KERNEL is None:
            warnings.warn(
                "transformer-engine not importable; the injected model uses the reference kernel",
                stacklevel=1,
            )
        with A.inject_te_attention(model, dot_product_attention_cls=cls):
            A.reset_te_attention_stats()
            got = model(ids).logits.float()
            stats = A.get_te_attention_stats()
    assert stats["te_hits"] == 2, stats
    # logits go through two bf16 layers and the lm head: compare relative to their scale
    torch.testing.assert_close(got, want, atol=5e-2 * want.abs().max().item(), rtol=0)
