from __future__ import annotations

import math

import pytest
import torch

from am_attention import ReferenceDotProductAttention


def naive(q, k, v, scale, window=None, causal=True):
    """fp64 softmax(QK^T)V per head on [S, H, D] tensors, with GQA by repetition."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("shd,thd->hst", q.double(), k.double()) * scale
    s = q.shape[0]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None]
    allowed = (j <= i) if causal else torch.ones(s, s, dtype=torch.bool)
    if window is not None:
        allowed = allowed & (j >= i - window)
    scores = scores.masked_fill(~allowed, -math.inf)
    return torch.einsum("hst,thd->shd", scores.softmax(-1), v.double()).float()


@pytest.mark.parametrize("window", [(-1, 0), (3, 0)])
def test_bshd_and_sbhd_causal_gqa_window(window):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 9, 4, 8), torch.randn(2, 9, 2, 8), torch.randn(2, 9, 2, 8)
    dpa = ReferenceDotProductAttention(
        4, 8, num_gqa_groups=2, qkv_format="bshd", window_size=window, softmax_scale=0.3
    )
    out = dpa(q, k, v)
    assert out.shape == (2, 9, 32)
    w = None if window[0] < 0 else window[0]
    for b in range(2):
        torch.testing.assert_close(out[b].view(9, 4, 8), naive(q[b], k[b], v[b], 0.3, w), atol=1e-5, rtol=0)
    out_sbhd = dpa(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), qkv_format="sbhd")
    torch.testing.assert_close(out_sbhd.transpose(0, 1), out, atol=1e-6, rtol=0)
    no_mask = dpa(q, k, v, attn_mask_type="no_mask")
    torch.testing.assert_close(
        no_mask[0].view(9, 4, 8), naive(q[0], k[0], v[0], 0.3, causal=False), atol=1e-5, rtol=0
    )


def test_thd_matches_per_document_and_zeroes_tail():
    torch.manual_seed(1)
    t = 12
    q, k, v = torch.randn(t, 4, 8), torch.randn(t, 1, 8), torch.randn(t, 1, 8)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)  # two docs, 2 padding tokens at the end
    dpa = ReferenceDotProductAttention(
        4, 8, num_gqa_groups=1, qkv_format="thd", attn_mask_type="padding_causal"
    )
    out = dpa(q, k, v, cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6, window_size=(2, 0))
    for s0, s1 in ((0, 4), (4, 10)):
        want = naive(q[s0:s1], k[s0:s1], v[s0:s1], 8**-0.5, window=2)
        torch.testing.assert_close(out[s0:s1].view(-1, 4, 8), want, atol=1e-5, rtol=0)
    assert out[10:].abs().max() == 0


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="qkv_format"):
        ReferenceDotProductAttention(4, 8, qkv_format="bhsd")
    dpa = ReferenceDotProductAttention(4, 8, qkv_format="thd")
    with pytest.raises(ValueError, match="cu_seqlens"):
        dpa(torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 4, 8))
    assert list(dpa.state_dict()) == []
