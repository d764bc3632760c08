"""Every fallback to SDPA computes the kernel's attention: packed documents stay apart, padding gives zeros.

am-packing hands "te" the raw indexed mask ([B, S] document ids, 0 = padding); transformers' SDPA cannot take
it, so a layer that falls back (not injected, dropout, another scale or window) builds the documents' mask.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

import am_attention as A

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import build

REF = A.ReferenceDotProductAttention
INDEXED = torch.tensor([[1, 1, 1, 2, 2, 2, 2, 0, 0], [1, 1, 2, 2, 2, 2, 3, 3, 3]])
SPANS = {0: [(0, 3), (3, 7)], 1: [(0, 2), (2, 6), (6, 9)]}


def _qkv(seed=0, seq=9):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, h, seq, 16, generator=g) for h in (4, 2, 2))


def _per_document(q, k, v, spans, scale, window=None):
    out = torch.zeros(q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    for b, doc_spans in spans.items():
        for s0, s1 in doc_spans:
            n = s1 - s0
            i = torch.arange(n)
            allowed = i[None] <= i[:, None]
            if window is not None:
                allowed &= i[None] > i[:, None] - window
            out[b, s0:s1] = F.scaled_dot_product_attention(
                q[b : b + 1, :, s0:s1],
                k[b : b + 1, :, s0:s1],
                v[b : b + 1, :, s0:s1],
                attn_mask=allowed,
                scale=scale,
                enable_gqa=True,
            ).transpose(1, 2)[0]
    return out


@pytest.fixture
def injected():
    model = build("mistral").eval()  # sliding window 6
    handle = A.inject_te_attention(model, dot_product_attention_cls=REF)
    yield model
    handle.revert()


@pytest.mark.parametrize(
    "case, reason",
    [
        ("not_injected", "fallback_not_injected"),
        ("scale", "fallback_scale_mismatch"),
        ("window", "fallback_window_mismatch"),
        ("kernel", None),
    ],
)
def test_indexed_mask_is_exact_on_every_path(injected, case, reason):
    attn = injected.model.layers[0].self_attn
    q, k, v = _qkv()
    scale, window, kwargs = attn.scaling, 6, {"sliding_window": 6}
    if case == "not_injected":
        plain = build("mistral").model.layers[0].self_attn  # reaches "te" without a kernel (a skipped layer)
        attn = plain
    elif case == "scale":
        scale = 0.3
    elif case == "window":
        window, kwargs = 4, {"sliding_window": 4}
    out, _ = A.te_attention_forward(attn, q, k, v, INDEXED, scaling=scale, **kwargs)
    stats = A.get_te_attention_stats()
    if reason is None:
        assert stats["te_thd_hits"] == 1, stats
    else:
        assert stats[reason] == 1 and stats["te_hits"] == 0, stats
    torch.testing.assert_close(out, _per_document(q, k, v, SPANS, scale, window), atol=1e-5, rtol=0)
    assert out[0, 7:].abs().max() == 0  # padding


@pytest.mark.parametrize("source", ["indexed", "position_ids"])
def test_dropout_fallback_keeps_documents_apart(injected, source):
    attn = injected.model.layers[0].self_attn
    q, k, v = _qkv()
    kwargs = {"sliding_window": 6}
    if source == "indexed":
        mask = INDEXED
    else:
        mask = None
        kwargs["position_ids"] = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3, 0, 1, 2]])
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 3:], v2[0, :, 3:] = 5.0, -5.0  # another document of row 0 changes

    def run(k, v):
        torch.manual_seed(0)  # the same dropout draws for both runs
        return A.te_attention_forward(attn, q, k, v, mask, dropout=0.5, scaling=attn.scaling, **kwargs)[0]

    first, second = run(k, v), run(k2, v2)
    assert A.get_te_attention_stats()["fallback_dropout"] == 2
    torch.testing.assert_close(first[0, :3], second[0, :3], atol=0, rtol=0)  # no attention across documents
    assert not torch.equal(first[0, 3:], second[0, 3:])


def test_position_ids_fallback_equals_kernel(injected):
    attn = injected.model.layers[0].self_attn
    q, k, v = _qkv()
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 5], [0, 1, 0, 1, 2, 3, 0, 1, 2]])
    kernel, _ = A.te_attention_forward(attn, q, k, v, None, scaling=attn.scaling, position_ids=position_ids)
    fallback, _ = A.te_attention_forward(
        attn, q, k, v, None, scaling=attn.scaling * (1 + 1e-3), position_ids=position_ids
    )
    stats = A.get_te_attention_stats()
    assert stats["te_thd_hits"] == 1 and stats["fallback_scale_mismatch"] == 1, stats
    torch.testing.assert_close(fallback, kernel, atol=2e-3, rtol=0)
    want = _per_document(q, k, v, {0: [(0, 3), (3, 9)], 1: [(0, 2), (2, 6), (6, 9)]}, attn.scaling, 6)
    torch.testing.assert_close(kernel, want, atol=1e-5, rtol=0)


def test_float_2d_mask_is_refused_by_name(injected):
    attn = injected.model.layers[0].self_attn
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="attention_mask"):
        A.te_attention_forward(attn, q, k, v, INDEXED.float(), scaling=attn.scaling)
