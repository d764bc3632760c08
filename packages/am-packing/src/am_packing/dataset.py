"""Pack a whole dataset ahead of training into fixed-length rows of whole documents.

`pack_dataset` bin-packs every document (never split) into rows of at most ``max_length`` tokens and
writes each row as ``input_ids`` (its documents concatenated, no padding), ``seq_lengths`` (the document
lengths, in order; TRL's ``pack_dataset`` format), ``position_ids`` (restarting at 0 per document: the same
boundaries in a column that ``Trainer(remove_unused_columns=True)`` keeps, since every causal LM's forward
takes it, while it drops ``seq_lengths``) and ``labels`` when the input has them. Fed to
`PackingCollator`, each row stays one row (padded to the collator's ``max_length``, indexed mask and
per-document ``position_ids`` exactly as if the collator had packed those documents), so every step gets
``per_device_train_batch_size`` rows instead of a number that varies with the sampled documents.

Strategies (both sort longest first, then place each document; any two rows together hold more than
``max_length`` tokens, so at most one row is half empty):

- ``"bfd"`` best-fit decreasing (default): the fullest row it still fits in. Rows are kept in buckets by
  free room (an integer in ``[1, max_length]``) over a sorted list of the distinct rooms: one bisect per
  document, O(n log n) in all.
- ``"ffd"`` first-fit decreasing: the oldest row it fits in, found in a max segment tree over rows' free
  room, O(n log n); the same rows as `PackingCollator`'s per-batch packing.

An HF ``datasets.Dataset`` is packed through ``Dataset.map(batched=True)`` on Arrow batches (lengths,
validation and the gather are vectorised; only the bin packing runs in Python on the lengths); a list of
examples (token lists, arrays, 1D tensors or mappings with ``input_ids``/``labels``) gives a list of rows.
"""

from __future__ import annotations

import bisect
import numbers
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .collator import _INT32_MAX, IGNORE_INDEX, _check_int, _check_max_length, _document

__all__ = ["STRATEGIES", "get_packing_efficiency", "pack_dataset"]

STRATEGIES = ("bfd", "ffd")
OVERLONG = ("error", "truncate", "drop")


# --------------------------------------------------------------------------- bin packing on lengths
def _decreasing(lengths: np.ndarray) -> np.ndarray:
    # longest first; equal lengths in dataset order (a stable sort), as the collator's FFD
    return np.argsort(-lengths, kind="stable")


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of item indices: longest first, each into the bin with the least room that still fits it."""
    lengths = np.asarray(lengths, dtype=np.int64)
    bins: list[list[int]] = []
    rooms: list[int] = []  # sorted distinct free rooms of the open bins
    buckets: dict[int, list[int]] = {}  # free room -> bins with that room
    order = _decreasing(lengths)
    for i, need in zip(order.tolist(), lengths[order].tolist()):
        j = bisect.bisect_left(rooms, need)
        if j == len(rooms):
            b, left = len(bins), capacity - need
            bins.append([i])
        else:
            room = rooms[j]
            bucket = buckets[room]
            b = bucket.pop()
            if not bucket:
                del buckets[room]
                del rooms[j]
            bins[b].append(i)
            left = room - need
        if left > 0:
            if left not in buckets:
                bisect.insort(rooms, left)
                buckets[left] = []
            buckets[left].append(b)
    return bins


def first_fit_decreasing_fast(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """`collator.first_fit_decreasing` in O(n log n): the leftmost bin with room, from a max segment tree."""
    lengths = np.asarray(lengths, dtype=np.int64)
    size = 1
    while size < max(1, len(lengths)):
        size *= 2
    # leaves are bins, unopened ones hold full room, so "leftmost bin that fits" also opens new bins in order
    tree = [capacity] * (2 * size)
    bins: list[list[int]] = []
    order = _decreasing(lengths)
    for i, need in zip(order.tolist(), lengths[order].tolist()):
        node = 1
        while node < size:
            node = 2 * node if tree[2 * node] >= need else 2 * node + 1
        b = node - size
        if b == len(bins):
            bins.append([])
        bins[b].append(i)
        tree[node] -= need
        node //= 2
        while node:
            tree[node] = max(tree[2 * node], tree[2 * node + 1])
            node //= 2
    return bins


_PACKERS = {"bfd": best_fit_decreasing, "ffd": first_fit_decreasing_fast}


def _plan(lengths: np.ndarray, max_length: int, strategy: str, rng: np.random.Generator | None) -> list:
    """Rows as lists of item indices in input order, row order shuffled when `rng` is given."""
    bins = [sorted(b) for b in _PACKERS[strategy](lengths, max_length)]
    if rng is not None:
        bins = [bins[k] for k in rng.permutation(len(bins)).tolist()]
    return bins


# --------------------------------------------------------------------------- arguments
def _check_choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")
    return value


def _check_seed(seed: Any) -> np.random.Generator | None:
    if seed is None:
        return None
    return np.random.default_rng(_check_int(seed, "seed", minimum=0))


def _overlong_error(index: int, n: int, max_length: int) -> ValueError:
    return ValueError(
        f"dataset index {index} has {n} tokens, more than max_length={max_length}; documents are never split: "
        "pass overlong='truncate' to cut it, overlong='drop' to leave it out, or raise max_length"
    )


# --------------------------------------------------------------------------- plain lists
def _pack_list(
    examples: Sequence[Any], max_length: int, strategy: str, overlong: str, rng: np.random.Generator | None
) -> list[dict[str, list[int]]]:
    with_labels = any(isinstance(e, Mapping) and e.get("labels") is not None for e in examples)
    docs: list[tuple[list[int], list[int]]] = []
    for i, example in enumerate(examples):
        if isinstance(example, Mapping) and "seq_lengths" in example:
            raise ValueError(f"dataset index {i} has 'seq_lengths': it is already a packed row")
        ids, labels = _document(example, f"dataset index {i}", _INT32_MAX, truncate=False)
        if len(ids) > max_length:
            if overlong == "error":
                raise _overlong_error(i, len(ids), max_length)
            if overlong == "drop":
                continue
            ids, labels = ids[:max_length], labels[:max_length]
        docs.append((ids, labels))
    if not docs:
        raise ValueError("dataset has no document to pack (empty, or every document dropped as over-long)")
    rows = []
    for members in _plan(np.array([len(d[0]) for d in docs]), max_length, strategy, rng):
        row = {
            "input_ids": [t for k in members for t in docs[k][0]],
            "seq_lengths": [len(docs[k][0]) for k in members],
            "position_ids": [p for k in members for p in range(len(docs[k][0]))],
        }
        if with_labels:
            row["labels"] = [t for k in members for t in docs[k][1]]
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- HF datasets (Arrow batches)
def _list_column(table: Any, name: str, minimum: int, first: int) -> tuple[Any, np.ndarray]:
    """(list array, lengths) of an integer list column, ValueError/TypeError naming the dataset index."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = table.column(name).combine_chunks()
    kind = column.type
    if not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)):
        raise TypeError(f"column {name!r} must hold lists of token ids, got Arrow type {kind}")
    if not pa.types.is_integer(kind.value_type):
        raise TypeError(f"column {name!r} must hold integer token ids, got Arrow type {kind}")
    if column.null_count:
        index = first + int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"dataset index {index}: {name} is None")
    values = column.flatten()
    lengths = pc.list_value_length(column).to_numpy(zero_copy_only=False).astype(np.int64)
    bad = values.is_null()
    if pa.types.is_signed_integer(kind.value_type):
        bad = pc.or_(bad, pc.less(values, minimum))
    if pc.any(bad).as_py():
        position = int(np.flatnonzero(bad.to_numpy(zero_copy_only=False))[0])
        row = int(np.searchsorted(np.cumsum(lengths), position, side="right"))
        raise ValueError(
            f"dataset index {first + row}: {name} holds {values[position].as_py()}, outside [{minimum}, 2**63 - 1]"
        )
    return column, lengths


def _gather(column: Any, members: np.ndarray, row_lengths: np.ndarray, cut: int) -> Any:
    """A list array: row r = the lists `members[...]` of row r concatenated (each cut to `cut` tokens)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    taken = pc.take(column, pa.array(members, type=pa.int64()))
    values = pc.list_slice(taken, 0, cut).flatten() if cut < _INT32_MAX else taken.flatten()
    return _lists(row_lengths, values)


def _lists(row_lengths: np.ndarray, values: Any) -> Any:
    """A list array of `values` cut into rows of `row_lengths` (large offsets past 2**31 - 1 values)."""
    import pyarrow as pa

    offsets = np.concatenate([[0], np.cumsum(row_lengths)])
    if offsets[-1] > _INT32_MAX:
        return pa.LargeListArray.from_arrays(pa.array(offsets, pa.int64()), values)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _pack_table(
    table: Any,
    indices: list[int],
    *,
    column: str,
    max_length: int,
    strategy: str,
    overlong: str,
    rng: np.random.Generator | None,
) -> Any:
    import pyarrow as pa

    first = indices[0] if indices else 0  # map batches are contiguous ranges of the dataset
    ids, lengths = _list_column(table, column, 0, first)
    labels = None
    if "labels" in table.column_names and column != "labels":
        labels, label_lengths = _list_column(table, "labels", IGNORE_INDEX, first)
        if (label_lengths != lengths).any():
            row = int(np.flatnonzero(label_lengths != lengths)[0])
            raise ValueError(
                f"dataset index {first + row}: {label_lengths[row]} labels for {lengths[row]} {column}"
            )
    if (lengths == 0).any():
        raise ValueError(
            f"dataset index {first + int(np.flatnonzero(lengths == 0)[0])} is empty; drop empty examples "
            "before packing (e.g. dataset.filter(lambda e: len(e[column]) > 0))"
        )
    keep = np.arange(len(lengths))
    long = lengths > max_length
    if long.any():
        if overlong == "error":
            row = int(np.flatnonzero(long)[0])
            raise _overlong_error(first + row, int(lengths[row]), max_length)
        if overlong == "drop":
            keep = np.flatnonzero(~long)
        lengths = np.minimum(lengths, max_length)
    if not len(keep):  # every document of this chunk dropped: no rows, same columns
        kinds = {"input_ids": ids.type.value_type, "seq_lengths": pa.int32(), "position_ids": pa.int32()}
        if labels is not None:
            kinds["labels"] = labels.type.value_type
        return pa.table({k: pa.array([], pa.list_(v)) for k, v in kinds.items()})
    bins = _plan(lengths[keep], max_length, strategy, rng)
    members = keep[np.fromiter((k for b in bins for k in b), dtype=np.int64, count=len(keep))]
    counts = np.fromiter((len(b) for b in bins), dtype=np.int64, count=len(bins))
    row_lengths = np.add.reduceat(lengths[members], np.concatenate([[0], np.cumsum(counts)[:-1]]))
    cut = max_length if long.any() else _INT32_MAX
    doc_lengths = lengths[members]
    starts = np.repeat(np.cumsum(doc_lengths) - doc_lengths, doc_lengths)
    positions = (np.arange(int(doc_lengths.sum())) - starts).astype(np.int32)
    out = {
        "input_ids": _gather(ids, members, row_lengths, cut),
        "seq_lengths": _lists(counts, pa.array(doc_lengths, pa.int32())),
        "position_ids": _lists(row_lengths, pa.array(positions)),
    }
    if labels is not None:
        out["labels"] = _gather(labels, members, row_lengths, cut)
    return pa.table(out)


def _pack_hf(
    dataset: Any,
    max_length: int,
    *,
    column: str,
    strategy: str,
    overlong: str,
    rng: np.random.Generator | None,
    chunk_size: int | None,
    num_proc: int | None,
) -> Any:
    names = dataset.column_names
    if column not in names:
        raise ValueError(f"column {column!r} is not in the dataset (columns: {names})")
    if "seq_lengths" in names:
        raise ValueError("the dataset has a 'seq_lengths' column: it is already packed")
    if len(dataset) == 0:
        raise ValueError("dataset is empty: pack_dataset needs at least one document")
    packed = dataset.with_format("arrow").map(
        _pack_table,
        batched=True,
        batch_size=chunk_size,
        with_indices=True,
        remove_columns=names,
        num_proc=num_proc,
        fn_kwargs=dict(column=column, max_length=max_length, strategy=strategy, overlong=overlong, rng=rng),
        desc=f"pack_dataset ({strategy}, max_length={max_length})",
    )
    if len(packed) == 0:
        raise ValueError("dataset has no document to pack (every document dropped as over-long)")
    return packed.with_format(dataset.format["type"])


def _is_hf_dataset(dataset: Any) -> bool:
    datasets = sys.modules.get("datasets")  # never imported here: an object of it exists only once it is
    return datasets is not None and isinstance(dataset, datasets.Dataset)


def pack_dataset(
    dataset: Any,
    max_length: int,
    *,
    strategy: str = "bfd",
    column: str = "input_ids",
    overlong: str = "error",
    seed: int | None = None,
    chunk_size: int | None = None,
    num_proc: int | None = None,
) -> Any:
    """Pack every document of `dataset` whole into rows of at most `max_length` tokens (see the module doc).

    `dataset`: an HF ``datasets.Dataset`` (documents in `column`, optional ``labels`` of the same lengths;
    other columns are dropped) or a list of examples. Returns the same kind: rows with ``input_ids``,
    ``seq_lengths``, ``position_ids`` (and ``labels``), for `PackingCollator` (padding and the pad token are the collator's).
    `overlong`: ``"error"`` (ValueError naming the dataset index), ``"truncate"`` or ``"drop"``. `seed`:
    shuffle the row order (default: packing order). `chunk_size` (HF only): pack each chunk of that many
    documents on its own, bounding memory (default: the whole dataset at once); `num_proc`: chunks in
    parallel. `get_packing_efficiency(rows, max_length)` reports the fraction of real tokens.
    """
    max_length = _check_max_length(max_length)
    strategy = _check_choice(strategy, "strategy", STRATEGIES)
    overlong = _check_choice(overlong, "overlong", OVERLONG)
    if not isinstance(column, str):
        raise TypeError(f"column must be a str, got {column!r}")
    rng = _check_seed(seed)
    if chunk_size is not None:
        chunk_size = _check_int(chunk_size, "chunk_size", minimum=1)
    if num_proc is not None:
        num_proc = _check_int(num_proc, "num_proc", minimum=1)
    if _is_hf_dataset(dataset):
        return _pack_hf(
            dataset,
            max_length,
            column=column,
            strategy=strategy,
            overlong=overlong,
            rng=rng,
            chunk_size=chunk_size,
            num_proc=num_proc,
        )
    if not isinstance(dataset, Sequence) or isinstance(dataset, (str, bytes)):
        raise TypeError(
            "dataset must be a datasets.Dataset (not an IterableDataset or DatasetDict) or a list of examples, "
            f"got {type(dataset).__name__}"
        )
    if column != "input_ids" or chunk_size is not None or num_proc is not None:
        raise ValueError(
            "column, chunk_size and num_proc apply to a datasets.Dataset; a list of examples packs "
            "'input_ids' (or bare token lists) all at once"
        )
    return _pack_list(dataset, max_length, strategy, overlong, rng)


def get_packing_efficiency(rows: Any, max_length: int) -> float:
    """Real tokens / row slots (``len(rows) * max_length``) of `pack_dataset`'s rows (1.0 = no padding)."""
    max_length = _check_max_length(max_length)
    if _is_hf_dataset(rows):
        import pyarrow.compute as pc

        column = rows.with_format("arrow")["seq_lengths"]
        real = pc.sum(pc.list_flatten(column)).as_py() or 0
    elif isinstance(rows, Sequence):
        real = 0
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping) or "seq_lengths" not in row:
                raise ValueError(f"rows[{i}] has no 'seq_lengths': rows must come from pack_dataset")
            lengths = row["seq_lengths"]
            if any(isinstance(n, bool) or not isinstance(n, numbers.Integral) for n in lengths):
                raise TypeError(f"rows[{i}]: seq_lengths must hold ints, got {lengths!r}")
            real += sum(lengths)
    else:
        raise TypeError(f"rows must be pack_dataset's output, got {type(rows).__name__}")
    return real / (len(rows) * max_length) if len(rows) else 0.0
