"""Indexed-mask helpers against a simple per-document loop reference (hypothesis over length mixes)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from am_packing import (
    get_seqlens_in_batch,
    get_unpad_data,
    is_indexed_packed_mask,
    validate_indexed_mask,
)
from am_packing.mask import document_ids_from_position_ids


def loop_reference(mask: torch.Tensor):
    """The seed's way: walk every row and document with Python loops."""
    lengths, indices, flat = [], [], mask.reshape(-1).tolist()
    for _r, row in enumerate(mask.tolist()):
        for d in range(1, max(row, default=0) + 1):
            lengths.append(row.count(d))
    indices = [i for i, v in enumerate(flat) if v > 0]
    cu = [0]
    for n in lengths:
        cu.append(cu[-1] + n)
    return lengths, indices, cu, max(lengths, default=0)


rows = st.lists(st.integers(1, 9), min_size=0, max_size=5)


@st.composite
def masks(draw):
    seq = draw(st.integers(1, 24))
    batch = draw(st.integers(1, 4))
    out = []
    for _ in range(batch):
        lens = draw(rows)
        row: list[int] = []
        for d, n in enumerate(lens, start=1):
            if len(row) + n > seq:
                break
            row += [d] * n
        out.append(row + [0] * (seq - len(row)))
    return torch.tensor(out)


@settings(max_examples=50, deadline=None)
@given(masks())
def test_unpad_matches_loop_reference(mask):
    lengths, indices, cu, longest = loop_reference(mask)
    data = get_unpad_data(mask)
    assert data.indices.tolist() == indices
    assert data.cu_seqlens.dtype == torch.int32 and data.cu_seqlens.tolist() == cu
    assert data.max_seqlen == longest and isinstance(data.max_seqlen, int)
    assert get_seqlens_in_batch(mask).tolist() == lengths
    assert is_indexed_packed_mask(mask) == (int(mask.max()) > 1)
    assert get_unpad_data(mask, max_seqlen=99).max_seqlen == 99


def test_seed_examples():
    mask = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
    assert get_seqlens_in_batch(mask).tolist() == [2, 3, 1, 2, 3]
    indices, cu, longest = get_unpad_data(mask)
    assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
    assert cu.tolist() == [0, 2, 5, 6, 8, 11] and longest == 3


def test_zero_one_masks_keep_transformers_meaning():
    """Left padding and bool masks behave like transformers' _get_unpad_data (one sequence per row)."""
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    for m in (mask, mask.bool()):
        indices, cu, longest = get_unpad_data(m)
        assert indices.tolist() == [2, 3, 4, 5, 6] and cu.tolist() == [0, 2, 5] and longest == 3
    assert not is_indexed_packed_mask(mask) and not is_indexed_packed_mask(mask.bool())
    assert not is_indexed_packed_mask(None) and not is_indexed_packed_mask(mask.float() * 2)


@pytest.mark.parametrize(
    ("mask", "row", "pos", "words"),
    [
        ([[1, 1, 3, 0]], 0, 2, "skips"),
        ([[1, 1, 1], [1, 2, 1]], 1, 2, "decreases"),
        ([[1, 2, 0, 3]], 0, 3, "padding followed by a token"),
        ([[1, 0, 2, 2]], 0, 2, "padding followed by a token"),
        ([[2, 2, 0]], 0, 0, "start with document 1"),
        ([[1, -1, 0]], 0, 1, "negative"),
    ],
)
def test_bad_masks_name_row_and_position(mask, row, pos, words):
    for fn in (validate_indexed_mask, get_unpad_data, get_seqlens_in_batch):
        with pytest.raises(ValueError, match=f"row {row}, position {pos}: .*{words}"):
            fn(torch.tensor(mask))


def test_bad_layouts():
    with pytest.raises(ValueError, match="float"):
        get_unpad_data(torch.ones(2, 3))
    with pytest.raises(ValueError, match="ndim=3"):
        get_unpad_data(torch.ones(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="ndim=1"):
        validate_indexed_mask(torch.ones(3, dtype=torch.long))


def test_document_ids_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert document_ids_from_position_ids(pos).tolist() == [[1, 1, 1, 2, 2, 3], [1, 1, 1, 1, 1, 1]]


# --------------------------------------------------------------------------- bad input (issue 15)
@pytest.mark.parametrize(
    ("call", "error", "words"),
    [
        (lambda: get_unpad_data(torch.tensor([[1, 1, 0]]), max_seqlen=-5), ValueError, "max_seqlen"),
        (lambda: get_unpad_data(torch.tensor([[1, 1, 0]]), max_seqlen=2.5), TypeError, "max_seqlen"),
        (lambda: get_unpad_data(torch.tensor([[1, 1, 0]]), max_seqlen=True), TypeError, "max_seqlen"),
        (lambda: get_unpad_data(torch.tensor([[1, 1, 0]]), strict="no"), TypeError, "strict"),
        (lambda: get_unpad_data(torch.zeros(2, 0, dtype=torch.long)), ValueError, r"attention_mask is empty"),
        (lambda: get_unpad_data(torch.zeros(0, 3, dtype=torch.long)), ValueError, r"attention_mask is empty"),
        (lambda: get_unpad_data(torch.ones(2, 3, dtype=torch.long, device="meta")), ValueError, "meta"),
        (lambda: get_seqlens_in_batch(torch.ones(2, 3, dtype=torch.long, device="meta")), ValueError, "meta"),
        (lambda: validate_indexed_mask(torch.ones(1, 2, 3, dtype=torch.long)), ValueError, "ndim=3"),
        (lambda: get_unpad_data(torch.ones(2, 3, dtype=torch.complex64)), ValueError, "complex"),
        (lambda: get_unpad_data([[1, 1, 0]]), TypeError, "attention_mask must be a torch.Tensor"),
        (lambda: document_ids_from_position_ids([[0, 1]]), TypeError, "position_ids"),
        (lambda: document_ids_from_position_ids(torch.zeros(1, 2)), ValueError, "position_ids"),
    ],
)
def test_bad_input_is_named(call, error, words):
    with pytest.raises(error, match=words):
        call()


@pytest.mark.parametrize(
    "mask",
    [
        torch.ones(2, 3, dtype=torch.complex64) * 2,
        torch.ones(2, 3, dtype=torch.long, device="meta") * 2,
        torch.zeros(2, 0, dtype=torch.long),
        "not a mask",
        torch.tensor([[1, 2]]).numpy(),
    ],
)
def test_is_indexed_packed_mask_never_raises(mask):
    assert is_indexed_packed_mask(mask) is False
