"""The packing collator: bin packing, labels that never cross a boundary, masks and positions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.data import DataLoader

from am_packing import DocumentIdMask, PackingCollator, get_unpad_data, pack_sequences
from am_packing.collator import first_fit_decreasing, packing_efficiency

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


# --------------------------------------------------------------------------- inputs (issues 15, 16)
@pytest.mark.parametrize(
    ("examples", "kwargs", "error", "words"),
    [
        ([[1.7, 2.9]], {}, TypeError, r"example 0: input_ids must hold integer token ids, found 1.7"),
        ([torch.tensor([1.0, 2.0])], {}, TypeError, r"example 0: input_ids .*float32"),
        ([np.array([1.5, 2.0])], {}, TypeError, r"example 0: input_ids .*float64"),
        ([np.array([True, False])], {}, TypeError, r"example 0: input_ids .*bool"),
        ([[True, 2]], {}, TypeError, r"example 0: input_ids .*True"),
        ([[1], [2**70]], {}, ValueError, r"example 1: input_ids holds 1180591620717411303424"),
        ([[1, -3]], {}, ValueError, r"example 0: input_ids holds -3"),
        ([{"input_ids": [1, 2], "labels": [1, 2.5]}], {}, TypeError, r"example 0: labels"),
        ([[1, 2]], {"pad_token_id": 1.5}, TypeError, "pad_token_id"),
        ([[1, 2]], {"pad_token_id": None}, TypeError, "pad_token_id"),
        ([[1, 2]], {"pad_token_id": -1}, ValueError, "pad_token_id"),
        ([[1, 2]], {"max_length": True}, TypeError, "max_length"),
        ([[1, 2]], {"max_length": 2.0}, TypeError, "max_length"),
        ([[1, 2]], {"truncate": "yes"}, TypeError, "truncate"),
        ([[1, 2]], {"mode": "flat"}, ValueError, "mode"),
        ("abc", {}, TypeError, "examples must be a sequence"),
        ([], {}, ValueError, "examples is empty"),
        ([np.ones((2, 2), dtype=np.int64)], {}, ValueError, r"example 0: input_ids must be 1D"),
    ],
)
def test_bad_input_is_named(examples, kwargs, error, words):
    kwargs = {"max_length": MAX, **kwargs}
    with pytest.raises(error, match=words):
        pack_sequences(examples, kwargs.pop("max_length"), **kwargs)


def test_numpy_list_and_tensor_inputs_give_the_same_batch():
    lists = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    ref = pack_sequences(lists, 8)
    for convert in (np.array, torch.tensor, lambda x: np.array(x, dtype=np.int32), tuple):
        got = pack_sequences([convert(x) for x in lists], 8)
        assert all(torch.equal(got[k], ref[k]) for k in ref)
    mapped = pack_sequences([{"input_ids": np.array(x), "labels": torch.tensor(x)} for x in lists], 8)
    assert all(torch.equal(mapped[k], ref[k]) for k in ref)


def test_position_ids_mode_is_transformers_padding_free_format():
    batch = pack_sequences([[5, 6, 7], [8, 9], [10]], 8, mode="position_ids")
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 10]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6] and batch["cu_seq_lens_q"].dtype == torch.int32
    assert batch["max_length_q"] == batch["max_length_k"] == 3 and batch["use_cache"] is False
    assert "attention_mask" not in batch


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_position_ids_mode_is_exact_on_an_unpatched_model(make_model, exact, arch, impl):
    model = make_model(arch, impl)
    docs = exact.documents()
    ref_logits, ref_grads = exact.per_document(model, docs)
    batch = PackingCollator(32, mode="position_ids")(docs)
    logits, grads = exact.packed(
        model, batch, **{k: v for k, v in batch.items() if k not in ("input_ids", "labels")}
    )
    start = 0
    for doc, ref in zip(docs, ref_logits):
        torch.testing.assert_close(logits[0, start : start + len(doc)], ref, atol=exact.ATOL, rtol=0)
        start += len(doc)
    exact.grads_close(ref_grads, grads)


def test_collator_marks_the_mask_and_counts():
    collate = PackingCollator(8)
    batch = collate([[1, 2, 3], [4, 5], [6]])
    assert isinstance(batch["attention_mask"], DocumentIdMask)
    assert batch["attention_mask"].document_ids.tolist() == [[1, 1, 1, 2, 2, 3, 0, 0]]
    assert int(batch["attention_mask"].sum()) == 6 == collate.real_tokens and collate.slots == 8
    flat = PackingCollator(8, mode="position_ids")
    flat([[1, 2, 3], [4, 5]])
    assert flat.efficiency == 1.0 and flat.real_tokens == 5


def test_from_tokenizer_reads_the_pad_token():
    class Tokenizer:
        pad_token_id = 7

    collate = PackingCollator.from_tokenizer(Tokenizer(), 6, mode="indexed")
    assert collate([[1, 2, 3]])["input_ids"].tolist() == [[1, 2, 3, 7, 7, 7]]
    Tokenizer.pad_token_id = None
    with pytest.raises(ValueError, match="has no pad_token_id"):
        PackingCollator.from_tokenizer(Tokenizer(), 6)


def test_over_long_examples_name_the_dataset_index():
    data = [[1, 2], [1, 2, 3], list(range(1, 20)), [4]]
    collate = PackingCollator(8)
    with pytest.raises(ValueError, match=r"example 0 has 19 tokens.*validate_dataset"):
        collate([data[2], data[0]])
    with pytest.raises(ValueError, match=r"dataset index 2 has 19 tokens, more than max_length=8"):
        collate.validate_dataset(data)
    collate.validate_dataset(data[:2])
    with pytest.raises(TypeError, match="dataset must support"):
        collate.validate_dataset(iter(data))
