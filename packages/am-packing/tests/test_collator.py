"""The packing collator: bin packing, labels that never cross a boundary, masks and positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from am_packing import (
    PackingCollator,
    first_fit_decreasing,
    get_unpad_data,
    pack_sequences,
    packing_efficiency,
)

MAX = 16


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(1, MAX), min_size=1, max_size=12), st.integers(0, 5))
def test_pack_sequences_properties(lengths, seed):
    g = torch.Generator().manual_seed(seed)
    docs = [torch.randint(1, 100, (n,), generator=g).tolist() for n in lengths]
    batch = pack_sequences(docs, MAX, pad_token_id=0)
    ids, labels, mask, pos = (
        batch["input_ids"],
        batch["labels"],
        batch["attention_mask"],
        batch["position_ids"],
    )
    assert ids.shape == labels.shape == mask.shape == pos.shape and ids.shape[1] == MAX
    # every document appears exactly once, contiguous, with positions 0..n-1
    found = []
    for r in range(ids.shape[0]):
        for d in range(1, int(mask[r].max()) + 1):
            sel = (mask[r] == d).nonzero().flatten()
            assert sel.tolist() == list(range(int(sel[0]), int(sel[0]) + len(sel)))
            assert pos[r, sel].tolist() == list(range(len(sel)))
            doc = ids[r, sel].tolist()
            found.append(doc)
            # label rule: first token -100, the rest are the tokens themselves
            assert labels[r, sel[0]] == -100 and labels[r, sel[1:]].tolist() == doc[1:]
    assert sorted(found) == sorted(docs)
    # padding: -100 labels, pad ids, and the mask is a valid indexed mask
    assert (labels[mask == 0] == -100).all() and (ids[mask == 0] == 0).all()
    get_unpad_data(mask)
    # no shifted (position t -> label t+1) target crosses a document boundary or lands on padding
    targets = labels[:, 1:]
    same_doc = (mask[:, 1:] == mask[:, :-1]) & (mask[:, 1:] > 0)
    assert ((targets != -100) <= same_doc).all()
    # first-fit never leaves two rows at most half full, so rows <= 2 * tokens / MAX + 1; and >= the volume bound
    lower = -(-sum(lengths) // MAX)
    assert lower <= ids.shape[0] <= 2 * sum(lengths) / MAX + 1
    # documents longer than half a row cannot share one: FFD uses exactly one row each for them at least
    assert ids.shape[0] >= sum(n > MAX // 2 for n in lengths)
    assert packing_efficiency(batch) == pytest.approx(sum(lengths) / ids.numel())


def test_first_fit_decreasing():
    bins = first_fit_decreasing([3, 8, 5, 2, 6], 10)
    assert sorted(i for b in bins for i in b) == [0, 1, 2, 3, 4] and len(bins) == 3


def test_over_long_examples():
    with pytest.raises(ValueError, match="example 1 has 20 tokens, more than max_length=16"):
        pack_sequences([[1, 2], list(range(1, 21))], MAX)
    batch = pack_sequences([[1, 2], list(range(1, 21))], MAX, truncate=True)
    assert batch["attention_mask"].eq(2).sum() + batch["attention_mask"].eq(1).sum() == 18


def test_bad_examples():
    with pytest.raises(ValueError, match="empty"):
        pack_sequences([[]], MAX)
    with pytest.raises(ValueError, match="max_length"):
        pack_sequences([[1]], 0)
    with pytest.raises(ValueError, match="3 labels for 2 input_ids"):
        pack_sequences([{"input_ids": [1, 2], "labels": [1, 2, 3]}], MAX)


def test_mapping_examples_keep_their_labels():
    batch = pack_sequences([{"input_ids": [5, 6, 7], "labels": [-100, -100, 7]}], 4, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 9]]
    assert batch["labels"].tolist() == [[-100, -100, 7, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0]]


def test_cu_seqlens_cover_every_token():
    batch = pack_sequences([[1] * 5, [2] * 7, [3] * 3], 10, return_cu_seqlens=True)
    cu = batch["cu_seq_lens_q"]
    assert cu.dtype == torch.int32 and int(cu[-1]) == batch["input_ids"].numel()
    assert batch["max_length_q"] == int((cu[1:] - cu[:-1]).max())


def test_collator_in_dataloader():
    data = [list(range(1, n + 1)) for n in (3, 9, 4, 12, 7, 1, 5)]
    collator = PackingCollator(16, pad_token_id=0)
    batches = list(DataLoader(data, batch_size=4, collate_fn=collator))
    assert len(batches) == 2
    real = sum(len(d) for d in data)
    assert collator.real_tokens == real and 0 < collator.efficiency <= 1
    assert collator.efficiency == pytest.approx(real / sum(b["input_ids"].numel() for b in batches))
