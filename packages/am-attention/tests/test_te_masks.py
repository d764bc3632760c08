from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from am_attention import detect_causal_mask
from am_attention.te_masks import cu_seqlens_from_indexed_mask, cu_seqlens_from_position_ids


def hf_mask(s, window=None, pad=None, doc_ids=None, batch=1, additive=False):
    """The mask transformers builds: causal band AND key padding AND same document, True = attend."""
    i = torch.arange(s)[:, None]
    j = torch.arange(s)[None, :]
    m = (j <= i).expand(batch, s, s).clone()
    if window is not None:
        m &= j > i - window
    if pad is not None:
        m &= pad[:, None, :]
    if doc_ids is not None:
        m &= doc_ids[:, :, None] == doc_ids[:, None, :]
    m = m[:, None]
    if additive:
        return torch.zeros(m.shape).masked_fill(~m, torch.finfo(torch.float32).min)
    return m


@st.composite
def masks(draw):
    s = draw(st.integers(1, 24))
    batch = draw(st.integers(1, 3))
    window = draw(st.one_of(st.none(), st.integers(1, 30)))
    pad = None
    if draw(st.booleans()):
        pad = torch.tensor(
            draw(st.lists(st.lists(st.booleans(), min_size=s, max_size=s), min_size=batch, max_size=batch))
        )
    docs = None
    if draw(st.booleans()):
        cuts = draw(st.lists(st.booleans(), min_size=s, max_size=s))
        docs = torch.tensor(cuts).cumsum(0).expand(batch, s)
    mask = hf_mask(s, window, pad, docs, batch, additive=draw(st.booleans()))
    if draw(st.booleans()):  # a random mask unrelated to transformers' family
        mask = torch.tensor(draw(st.lists(st.booleans(), min_size=s * s, max_size=s * s))).view(1, 1, s, s)
    return mask, window


@settings(max_examples=50, deadline=None)
@given(masks())
def test_detect_never_misclassifies(case):
    mask, window = case
    s = mask.shape[-1]
    te_window = (-1, 0) if window is None else (window - 1, 0)
    got = detect_causal_mask(mask, te_window)
    canonical = hf_mask(s, window, batch=mask.shape[0])
    visible = mask if mask.dtype == torch.bool else mask == 0
    truly = bool((visible == canonical).all())
    if got is not None:
        assert truly, "classified a non-canonical mask as causal"
        assert got == ("causal", te_window)
    # transformers-family masks are decided exactly
    if truly:
        assert got == ("causal", te_window)


def test_recognises_causal_and_sliding_and_rejects_padding():
    assert detect_causal_mask(hf_mask(12)) == ("causal", (-1, 0))
    assert detect_causal_mask(hf_mask(12, window=4), (3, 0)) == ("causal", (3, 0))
    assert detect_causal_mask(hf_mask(12, window=4), (-1, 0)) is None  # sliding mask, full-attention layer
    assert detect_causal_mask(hf_mask(12), (3, 0)) is None
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, :3] = False
    assert detect_causal_mask(hf_mask(12, pad=pad, batch=2)) is None
    pad = torch.ones(1, 12, dtype=torch.bool)
    pad[0, 6] = False  # padding in the middle
    assert detect_causal_mask(hf_mask(12, pad=pad)) is None
    assert detect_causal_mask(torch.ones(1, 1, 4, 6, dtype=torch.bool)) is None
    with pytest.raises(TypeError):
        detect_causal_mask([[1]])


class _CountElements(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.elements += t.numel()
        return out


def _elements_touched(s):
    mask = hf_mask(s, window=64)
    with _CountElements() as counter:
        assert detect_causal_mask(mask, (63, 0)) is not None
    return counter.elements


def test_detection_work_is_linear_in_s():
    small, large = _elements_touched(256), _elements_touched(2048)
    # 8x the length: linear work grows ~8x, an S*S pass would grow 64x
    assert large < 10 * small, (small, large)
    assert large < 100 * 2048 < 2048 * 2048 // 20


def test_cu_seqlens_from_position_ids_and_indexed_mask():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    info = cu_seqlens_from_position_ids(pos)
    assert info.cu_seqlens.tolist() == [0, 3, 5, 9] and info.max_seqlen == 4
    assert info.cu_seqlens.dtype == torch.int32
    assert cu_seqlens_from_position_ids(torch.arange(6)[None].expand(2, 6)) is None
    indexed = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 0, 0]])
    info = cu_seqlens_from_indexed_mask(indexed)
    assert info.cu_seqlens.tolist() == [0, 2, 5, 6, 8, 9] and info.max_seqlen == 3
    assert info.indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9]
    with pytest.raises(ValueError, match="integer"):
        cu_seqlens_from_indexed_mask(torch.ones(2, 3))
