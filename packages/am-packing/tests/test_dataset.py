"""pack_dataset: whole documents into fixed rows (BFD / FFD), the collator keeping each row, exactness."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from am_packing import PackingCollator, enable_packing, get_packing_efficiency, pack_dataset, pack_sequences
from am_packing.collator import first_fit_decreasing
from am_packing.dataset import best_fit_decreasing, first_fit_decreasing_fast

MAX = 16
lengths_st = st.lists(st.integers(1, MAX), min_size=1, max_size=40)


@pytest.fixture(scope="module")
def hf():
    """The datasets module; only the tests that need it skip without it."""
    return pytest.importorskip("datasets", reason="datasets is not installed (am-packing[test] has it)")


def _docs(lengths):
    """Documents that are all different (document k holds tokens 1000*k + j), so each can be traced."""
    return [[1000 * k + j for j in range(n)] for k, n in enumerate(lengths)]


def _naive_bfd_loads(lengths, capacity):
    """Best-fit decreasing the slow way (scan every bin); bins with equal room are interchangeable, so the
    sorted loads do not depend on how ties between them are broken."""
    loads = []
    for n in sorted(lengths, reverse=True):
        fits = [b for b, load in enumerate(loads) if load + n <= capacity]
        if fits:
            loads[max(fits, key=lambda b: loads[b])] += n
        else:
            loads.append(n)
    return sorted(loads)


def _optimum(lengths, capacity):
    """The fewest bins, by trying every assignment (tiny inputs only)."""
    best = len(lengths)
    for assignment in itertools.product(range(len(lengths)), repeat=len(lengths)):
        loads = [0] * len(lengths)
        for n, b in zip(lengths, assignment):
            loads[b] += n
        if max(loads) <= capacity:
            best = min(best, sum(load > 0 for load in loads))
    return best


def _check_rows(rows, docs, max_length, *, any_fit=True):
    found = []
    for row in rows:
        assert sum(row["seq_lengths"]) == len(row["input_ids"]) <= max_length
        assert row["position_ids"] == [p for n in row["seq_lengths"] for p in range(n)]
        start, members = 0, []
        for n in row["seq_lengths"]:
            doc = row["input_ids"][start : start + n]
            members.append(doc[0] // 1000)
            assert doc == docs[doc[0] // 1000]  # whole and unchanged
            start += n
        assert members == sorted(members)  # dataset order inside a row, as the collator does
        found += members
    assert sorted(found) == list(range(len(docs)))  # every document exactly once
    loads = sorted(len(r["input_ids"]) for r in rows)
    # any-fit: a document only opens a row when it fits in no open one, so any two rows overflow together
    assert not any_fit or len(loads) < 2 or loads[0] + loads[1] > max_length
    return loads


@settings(max_examples=60, deadline=None)
@given(lengths_st, st.sampled_from(["bfd", "ffd"]))
def test_pack_dataset_properties(lengths, strategy):
    docs = _docs(lengths)
    rows = pack_dataset(docs, MAX, strategy=strategy)
    loads = _check_rows(rows, docs, MAX)
    assert get_packing_efficiency(rows, MAX) == pytest.approx(sum(lengths) / (len(rows) * MAX))
    if strategy == "bfd":
        assert loads == _naive_bfd_loads(lengths, MAX)
    else:  # the same rows as the collator's quadratic FFD
        expected = [sorted(b) for b in first_fit_decreasing(lengths, MAX)]
        assert [[d[0] // 1000 for d in _split(r)] for r in rows] == expected


def _split(row):
    start, out = 0, []
    for n in row["seq_lengths"]:
        out.append(row["input_ids"][start : start + n])
        start += n
    return out


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 10), min_size=1, max_size=6), st.sampled_from(["bfd", "ffd"]))
def test_rows_within_the_ffd_bound_of_the_optimum(lengths, strategy):
    rows = pack_dataset(_docs(lengths), 10, strategy=strategy)
    assert len(rows) <= 11 / 9 * _optimum(lengths, 10) + 6 / 9


def test_fast_packers_match_the_quadratic_ones_on_many_documents():
    lengths = np.random.default_rng(0).integers(1, 300, 3000)
    assert first_fit_decreasing_fast(lengths, 512) == first_fit_decreasing(lengths.tolist(), 512)
    loads = sorted(int(lengths[b].sum()) for b in best_fit_decreasing(lengths, 512))
    assert loads == _naive_bfd_loads(lengths.tolist(), 512)


def test_overlong_documents_error_truncate_or_drop():
    docs = [[1, 2], list(range(1, 20)), [3]]
    with pytest.raises(ValueError, match=r"dataset index 1 has 19 tokens, more than max_length=8.*overlong="):
        pack_dataset(docs, 8)
    cut = pack_dataset(docs, 8, overlong="truncate")
    assert sorted(map(tuple, (d for r in cut for d in _split(r)))) == [(1, 2), (1, 2, 3, 4, 5, 6, 7, 8), (3,)]
    kept = pack_dataset(docs, 8, overlong="drop")
    assert sorted(d for r in kept for d in _split(r)) == [[1, 2], [3]]
    with pytest.raises(ValueError, match="no document to pack"):
        pack_dataset([list(range(9))], 8, overlong="drop")


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: pack_dataset([[1]], 0), ValueError, "max_length"),
        (lambda: pack_dataset([[1]], 2.0), TypeError, "max_length"),
        (lambda: pack_dataset([[1]], 4, strategy="wrapped"), ValueError, r"strategy.*'wrapped'"),
        (lambda: pack_dataset([[1]], 4, overlong="split"), ValueError, r"overlong.*'split'"),
        (lambda: pack_dataset([[1]], 4, seed=-1), ValueError, "seed"),
        (lambda: pack_dataset([[1]], 4, column="text"), ValueError, "column"),
        (lambda: pack_dataset("abc", 4), TypeError, "dataset must be"),
        (lambda: pack_dataset([[1], []], 4), ValueError, "dataset index 1 is empty"),
        (lambda: pack_dataset([[1], [2, -3]], 4), ValueError, "dataset index 1: input_ids holds -3"),
        (lambda: pack_dataset([[1], [2.0]], 4), TypeError, "dataset index 1: input_ids must hold integer"),
        (lambda: pack_dataset([{"input_ids": [1], "seq_lengths": [1]}], 4), ValueError, "already a packed"),
        (lambda: pack_dataset([], 4), ValueError, "no document"),
        (lambda: get_packing_efficiency([{"input_ids": [1]}], 4), ValueError, r"rows\[0\]"),
    ],
)
def test_bad_inputs_raise_naming_them(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_seed_shuffles_rows_deterministically():
    docs = _docs([5, 9, 3, 12, 7, 4, 8, 6, 2, 11])
    plain = pack_dataset(docs, MAX)
    a, b = pack_dataset(docs, MAX, seed=3), pack_dataset(docs, MAX, seed=3)
    assert a == b and a != plain and sorted(map(str, a)) == sorted(map(str, plain))


# --------------------------------------------------------------------------- the collator keeps rows
def test_collator_keeps_each_row_and_packs_it_like_its_own_packing():
    docs = _docs([5, 9, 3, 12, 7, 4, 8, 6, 2, 11])
    rows = pack_dataset(docs, MAX)
    collate = PackingCollator(MAX, pad_token_id=7)
    batch = collate(rows[:3])
    assert batch["input_ids"].shape == (3, MAX)  # one row per example, whatever the documents
    for r, row in enumerate(rows[:3]):
        alone = pack_sequences(_split(row), MAX, pad_token_id=7)  # these documents fit one collator row
        assert alone["input_ids"].shape[0] == 1
        for key in ("input_ids", "labels", "position_ids"):
            assert batch[key][r].tolist() == alone[key][0].tolist(), key
        assert batch["attention_mask"].document_ids[r].tolist() == alone["attention_mask"][0].tolist()
    assert collate.efficiency == pytest.approx(sum(len(r["input_ids"]) for r in rows[:3]) / (3 * MAX))
    flat = PackingCollator(MAX, mode="position_ids")(rows[:2])
    assert flat["position_ids"][0].tolist() == [
        p for r in rows[:2] for n in r["seq_lengths"] for p in range(n)
    ]


def test_rows_keep_their_documents_without_seq_lengths():
    """Trainer(remove_unused_columns=True) drops seq_lengths (no forward argument) but keeps position_ids."""
    rows = pack_dataset(_docs([5, 9, 3, 12, 7, 4, 8, 6, 2, 11]), MAX)
    trimmed = [{k: v for k, v in r.items() if k != "seq_lengths"} for r in rows]
    full, cut = PackingCollator(MAX)(rows), PackingCollator(MAX)(trimmed)
    for key in ("input_ids", "labels", "position_ids"):
        assert torch.equal(full[key], cut[key])
    assert torch.equal(full["attention_mask"].document_ids, cut["attention_mask"].document_ids)


def test_collator_refuses_bad_rows():
    collate = PackingCollator(8)
    with pytest.raises(ValueError, match=r"example 0 is a packed row of 10 tokens.*never cut"):
        collate([{"input_ids": list(range(10)), "seq_lengths": [5, 5]}])
    with pytest.raises(ValueError, match=r"example 0: seq_lengths \[2\] sum to 2, but it has 3 input_ids"):
        collate([{"input_ids": [1, 2, 3], "seq_lengths": [2]}])
    with pytest.raises(
        ValueError, match=r"example 0: position_ids must restart at 0.*got 0 then 2 at position 1"
    ):
        collate([{"input_ids": [1, 2, 3], "position_ids": [0, 2, 0]}])
    with pytest.raises(ValueError, match=r"example 0: position_ids must start at 0, got 1"):
        collate([{"input_ids": [1, 2], "position_ids": [1, 2]}])
    with pytest.raises(ValueError, match=r"seq_lengths \[1, 2\] disagree .* position_ids \[2, 1\]"):
        collate([{"input_ids": [1, 2, 3], "position_ids": [0, 1, 0], "seq_lengths": [1, 2]}])
    with pytest.raises(ValueError, match=r"example 0: 2 position_ids for 3 input_ids"):
        collate([{"input_ids": [1, 2, 3], "position_ids": [0, 1]}])
    with pytest.raises(ValueError, match=r"mix packed rows.*example 1.*example 0"):
        collate([[1, 2], {"input_ids": [1, 2], "seq_lengths": [2]}])
    with pytest.raises(ValueError, match="dataset index 1 is a packed row"):
        collate.validate_dataset(
            [{"input_ids": [1], "seq_lengths": [1]}, {"input_ids": [1] * 9, "seq_lengths": [9]}]
        )


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("source", ["list", "datasets"])
def test_packed_dataset_rows_are_exact_on_a_tiny_llama(request, make_model, exact, impl, source):
    """Rows from pack_dataset -> PackingCollator -> enable_packing: each document's logits == it alone."""
    model = make_model("llama", impl)
    docs = exact.documents(lengths=(12, 5, 20, 9, 1, 17, 3, 14))
    data = docs
    if source == "datasets":
        hf = request.getfixturevalue("hf")
        data = hf.Dataset.from_dict({"input_ids": docs, "text": ["x"] * len(docs)})
    rows = pack_dataset(data, 32)
    assert len(rows) < len(docs)
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = PackingCollator(32)(list(rows))
    with enable_packing(model), torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
        ).logits
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


# --------------------------------------------------------------------------- HF datasets
@settings(max_examples=15, deadline=None)
@given(lengths_st, st.sampled_from(["bfd", "ffd"]), st.sampled_from([None, 7]))
def test_hf_dataset_packs_like_the_list(hf, lengths, strategy, chunk):
    docs = _docs(lengths)
    ds = hf.Dataset.from_dict({"input_ids": docs, "labels": docs, "other": list(lengths)})
    packed = pack_dataset(ds, MAX, strategy=strategy, chunk_size=chunk)
    assert packed.column_names == ["input_ids", "seq_lengths", "position_ids", "labels"]
    rows = packed.to_list()
    _check_rows(rows, docs, MAX, any_fit=chunk is None)  # chunks are packed apart
    assert all(r["labels"] == r["input_ids"] for r in rows)
    if chunk is None:
        assert [{k: v for k, v in r.items() if k != "labels"} for r in rows] == pack_dataset(
            docs, MAX, strategy=strategy
        )
    assert get_packing_efficiency(packed, MAX) == pytest.approx(sum(lengths) / (len(rows) * MAX))


def test_hf_dataset_errors_name_the_dataset_index(hf):
    docs = [[1, 2]] * 10 + [list(range(20))] + [[3]]
    ds = hf.Dataset.from_dict({"input_ids": docs})
    for chunk in (None, 4):  # index 10 sits in the third chunk of 4
        with pytest.raises(ValueError, match="dataset index 10 has 20 tokens, more than max_length=8"):
            pack_dataset(ds, 8, chunk_size=chunk)
    cut = pack_dataset(ds, 8, overlong="truncate").to_list()
    assert list(range(8)) in [d for r in cut for d in _split(r)]
    assert sum(len(r["seq_lengths"]) for r in pack_dataset(ds, 8, overlong="drop")) == 11
    lone = hf.Dataset.from_dict({"input_ids": [[1], list(range(9)), list(range(9))]})
    assert pack_dataset(lone, 8, overlong="drop", chunk_size=2).to_list() == [  # chunk 2 drops all it has
        {"input_ids": [1], "seq_lengths": [1], "position_ids": [0]}
    ]
    cases = [
        ({"input_ids": [[1], [2, -1]]}, ValueError, "dataset index 1: input_ids holds -1"),
        ({"input_ids": [[1], []]}, ValueError, "dataset index 1 is empty"),
        ({"input_ids": [[1], None]}, ValueError, "dataset index 1: input_ids is None"),
        ({"input_ids": [[1.0]]}, TypeError, "column 'input_ids' must hold integer token ids"),
        ({"input_ids": [[1, 2]], "labels": [[1]]}, ValueError, "dataset index 0: 1 labels for 2"),
        (
            {"tokens": [[1]]},
            ValueError,
            r"column 'input_ids' is not in the dataset \(columns: \['tokens'\]\)",
        ),
        ({"input_ids": [[1]], "seq_lengths": [[1]]}, ValueError, "already packed"),
    ]
    for columns, error, match in cases:
        with pytest.raises(error, match=match):
            pack_dataset(hf.Dataset.from_dict(columns), 8)
    packed = pack_dataset(hf.Dataset.from_dict({"tokens": [[5, 6], [7]]}), 8, column="tokens")
    assert packed.to_list() == [{"input_ids": [5, 6, 7], "seq_lengths": [2, 1], "position_ids": [0, 1, 0]}]
    with pytest.raises(TypeError, match="not an IterableDataset"):
        pack_dataset(ds.to_iterable_dataset(), 8)


junk = st.one_of(
    st.none(), st.booleans(), st.integers(-5, 40), st.floats(), st.text(max_size=3), st.just(torch.ones(2))
)


@settings(max_examples=80, deadline=None)
@given(st.one_of(junk, st.lists(st.one_of(junk, st.lists(junk, max_size=4)), max_size=4)), junk)
def test_any_input_packs_or_raises_a_named_error(dataset, max_length):
    try:
        rows = pack_dataset(dataset, max_length)
    except (TypeError, ValueError) as exc:
        assert any(n in str(exc) for n in ("dataset", "max_length", "input_ids")), str(exc)
    else:
        assert sum(len(r["input_ids"]) for r in rows) == sum(len(d) for d in dataset)
