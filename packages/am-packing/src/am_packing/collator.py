"""Pack tokenised examples into rows with document boundaries, per-document positions and safe labels.

Two output modes:

- ``"indexed"`` (default): first-fit-decreasing rows ``[rows, max_length]`` with an indexed mask (1-based
  document id per token, 0 = padding). `PackingCollator` marks that mask (`DocumentIdMask`) so that only a
  model prepared with `enable_packing` (or `configure_packing`) accepts it; `pack_sequences` returns it plain.
  Rows packed ahead of time by `pack_dataset` (``input_ids`` + ``seq_lengths`` / ``position_ids``) stay one
  row each, so every batch has exactly as many rows as examples.
- ``"position_ids"``: transformers' own padding-free format (like its ``DataCollatorWithFlattening``): every
  document concatenated into one row ``[1, total_tokens]``, ``position_ids`` restarting at 0 per document, no
  attention mask, ``cu_seq_lens_q/k`` and ``max_length_q/k`` for varlen kernels, and ``use_cache=False``
  (transformers only packs by position_ids when no KV cache is built). Exact on an unpatched model with
  sdpa, eager, flex_attention and flash_attention_2/3; token counters count it right (no padding at all).

Label rule (why the *first* token of each document gets -100): transformers' causal-LM loss shifts
labels inside the loss, so the logit at position ``t`` is scored against ``labels[t + 1]``. In a packed
row the last token of document A sits right before the first token of document B; setting
``labels[first token of B] = -100`` is exactly what stops A's last position from being trained to
predict B's first token. Run alone, a document never predicts its own first token either (the shift
drops it), so the packed loss covers the same (position, target) pairs as the unpacked documents.
Padding gets -100 as well, so the last real token of a row predicts nothing.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .marker import DocumentIdMask, as_plain

__all__ = ["PackingCollator", "first_fit_decreasing", "pack_sequences", "packing_efficiency"]

IGNORE_INDEX = -100
MODES = ("indexed", "position_ids")
_INT64_MAX = 2**63 - 1
_INT32_MAX = 2**31 - 1


def _check_int(value: Any, name: str, *, minimum: int, maximum: int = _INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if not minimum <= int(value) <= maximum:
        raise ValueError(f"{name} must be an int in [{minimum}, {maximum}], got {value!r}")
    return int(value)


def _check_max_length(value: Any) -> int:
    # cu_seqlens are int32, so no row (and no batch) can hold more tokens than that
    return _check_int(value, "max_length", minimum=1, maximum=_INT32_MAX)


def _check_flag(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    return mode


def _token_list(value: Any, what: str, where: str, *, minimum: int) -> list[int]:
    """`value` (list/tuple of ints, 1D integer numpy array or tensor) as a list of ints in [minimum, 2**63)."""
    value = as_plain(value)
    if isinstance(value, torch.Tensor) or (hasattr(value, "dtype") and hasattr(value, "ndim")):
        dtype = value.dtype  # a tensor or a numpy array
        if isinstance(dtype, torch.dtype):
            integer = not (dtype == torch.bool or dtype.is_floating_point or dtype.is_complex)
        else:
            integer = getattr(dtype, "kind", None) in ("i", "u")
        if not integer:
            raise TypeError(f"{where}: {what} must hold integer token ids, got dtype {dtype}")
        if value.ndim != 1:
            raise ValueError(f"{where}: {what} must be 1D, got shape {tuple(value.shape)}")
        if getattr(value, "is_meta", False):
            raise ValueError(f"{where}: {what} is on the meta device and has no values")
        tokens = value.tolist()
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        tokens = list(value)
        for v in tokens:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(
                    f"{where}: {what} must hold integer token ids, found {v!r} ({type(v).__name__})"
                )
        tokens = [int(v) for v in tokens]
    else:
        raise TypeError(
            f"{where}: {what} must be a sequence of ints, a 1D integer tensor or numpy array, "
            f"got {type(value).__name__}"
        )
    bad = next((v for v in tokens if not minimum <= v <= _INT64_MAX), None)
    if bad is not None:
        raise ValueError(f"{where}: {what} holds {bad}, outside [{minimum}, 2**63 - 1]")
    return tokens


def _document(example: Any, where: str, max_length: int, truncate: bool) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one example; raises naming `where` (its batch position or dataset index)."""
    if isinstance(example, Mapping):
        if "input_ids" not in example:
            raise ValueError(f"{where} has no 'input_ids' key (keys: {sorted(map(str, example))})")
        ids = _token_list(example["input_ids"], "input_ids", where, minimum=0)
        if example.get("labels") is not None:
            labels = _token_list(example["labels"], "labels", where, minimum=IGNORE_INDEX)
            if len(labels) != len(ids):
                raise ValueError(f"{where}: {len(labels)} labels for {len(ids)} input_ids")
        else:
            labels = list(ids)
    else:
        ids = _token_list(example, "input_ids", where, minimum=0)
        labels = list(ids)
    if not ids:
        raise ValueError(f"{where} is empty; drop empty examples before packing")
    if len(ids) > max_length:
        if not truncate:
            raise ValueError(
                f"{where} has {len(ids)} tokens, more than max_length={max_length}; "
                "pass truncate=True to cut it, or raise max_length"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


def _is_packed_row(example: Any) -> bool:
    return isinstance(example, Mapping) and ("seq_lengths" in example or "position_ids" in example)


def _lengths_from_positions(value: Any, where: str) -> list[int]:
    """Document lengths of a row whose ``position_ids`` restart at 0 for every document."""
    positions = _token_list(value, "position_ids", where, minimum=0)
    if positions and positions[0] != 0:
        raise ValueError(f"{where}: position_ids must start at 0, got {positions[0]}")
    lengths: list[int] = []
    for i, p in enumerate(positions):
        if p == 0:
            lengths.append(1)
        elif p == positions[i - 1] + 1:
            lengths[-1] += 1
        else:
            raise ValueError(
                f"{where}: position_ids must restart at 0 per document and count up by 1, got "
                f"{positions[i - 1]} then {p} at position {i}"
            )
    return lengths


def _row_documents(example: Mapping, where: str, max_length: int) -> list[tuple[list[int], list[int]]]:
    """The documents of one pre-packed row (``input_ids`` with ``seq_lengths`` and/or per-document
    ``position_ids``, as `pack_dataset` writes it; TRL's ``pack_dataset`` writes ``seq_lengths``). A row is
    never cut, so one longer than `max_length` raises."""
    ids, labels = _document(example, where, _INT32_MAX, truncate=False)
    lengths = None
    if "seq_lengths" in example:
        lengths = _token_list(example["seq_lengths"], "seq_lengths", where, minimum=1)
        if sum(lengths) != len(ids):
            raise ValueError(
                f"{where}: seq_lengths {lengths} sum to {sum(lengths)}, but it has {len(ids)} input_ids"
            )
    if "position_ids" in example:
        from_positions = _lengths_from_positions(example["position_ids"], where)
        if sum(from_positions) != len(ids):
            raise ValueError(f"{where}: {sum(from_positions)} position_ids for {len(ids)} input_ids")
        if lengths is not None and lengths != from_positions:
            raise ValueError(
                f"{where}: seq_lengths {lengths} disagree with the documents of its position_ids {from_positions}"
            )
        lengths = from_positions
    if len(ids) > max_length:
        raise ValueError(
            f"{where} is a packed row of {len(ids)} tokens, more than max_length={max_length}; rows are never "
            "cut: pack the dataset with a max_length no larger than the collator's"
        )
    docs, start = [], 0
    for n in lengths:
        docs.append((ids[start : start + n], labels[start : start + n]))
        start += n
    return docs


def _normalise(
    examples: Any, max_length: int, truncate: bool
) -> tuple[list[tuple[list[int], list[int]]], list[list[int]] | None]:
    """(documents, rows): rows are the document indices of each pre-packed row, None for single documents."""
    if not isinstance(examples, Sequence) or isinstance(examples, (str, bytes, Mapping)):
        raise TypeError(f"examples must be a sequence of examples, got {type(examples).__name__}")
    if not examples:
        raise ValueError("examples is empty: pack_sequences needs at least one example")
    packed = [_is_packed_row(e) for e in examples]
    if not any(packed):
        return [_document(e, f"example {i}", max_length, truncate) for i, e in enumerate(examples)], None
    if not all(packed):
        raise ValueError(
            "examples mix packed rows (with 'seq_lengths' or 'position_ids', e.g. example "
            f"{packed.index(True)}) and single documents (e.g. example {packed.index(False)}); pass one kind "
            "per batch"
        )
    docs: list[tuple[list[int], list[int]]] = []
    rows: list[list[int]] = []
    for i, e in enumerate(examples):
        row = _row_documents(e, f"example {i}", max_length)
        rows.append(list(range(len(docs), len(docs) + len(row))))
        docs += row
    return docs, rows


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of example indices: longest first, each into the first bin with room (FFD, <= 11/9 OPT + 1 bins)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        need = lengths[i]
        for b, free in enumerate(room):
            if need <= free:
                bins[b].append(i)
                room[b] -= need
                break
        else:
            bins.append([i])
            room.append(capacity - need)
    return bins


def packing_efficiency(batch: Mapping[str, Any]) -> float:
    """Fraction of the row slots that hold real tokens (1.0 = no padding)."""
    mask = batch.get("attention_mask")
    if mask is None:  # position_ids mode: one row of real tokens
        return 1.0
    mask = as_plain(mask)
    return float((mask > 0).sum()) / max(1, mask.numel())


def _cu_seqlens(seqlens: list[int]) -> dict[str, Any]:
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
    return dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(seqlens), max_length_k=max(seqlens))


def _flattened(docs: list[tuple[list[int], list[int]]]) -> dict[str, Any]:
    ids = [t for d, _ in docs for t in d]
    labels: list[int] = []
    positions: list[int] = []
    for d, labs in docs:
        labels += [IGNORE_INDEX, *labs[1:]]  # see module docstring: no loss crosses a boundary
        positions += range(len(d))
    batch: dict[str, Any] = {
        "input_ids": torch.tensor([ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "position_ids": torch.tensor([positions], dtype=torch.long),
    }
    batch.update(_cu_seqlens([len(d) for d, _ in docs]))
    batch["use_cache"] = False
    return batch


def _rows(
    docs: list[tuple[list[int], list[int]]],
    bins: list[list[int]] | None,
    max_length: int,
    pad_token_id: int,
    return_cu_seqlens: bool,
) -> dict[str, Any]:
    if bins is None:
        bins = first_fit_decreasing([len(d[0]) for d in docs], max_length)
    rows = len(bins)
    input_ids = torch.full((rows, max_length), pad_token_id, dtype=torch.long)
    labels = torch.full((rows, max_length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((rows, max_length), dtype=torch.long)
    positions = torch.zeros((rows, max_length), dtype=torch.long)
    seqlens: list[int] = []
    for r, members in enumerate(bins):
        start = 0
        for doc_number, i in enumerate(sorted(members), start=1):  # input order inside a row
            ids, labs = docs[i]
            n = len(ids)
            input_ids[r, start : start + n] = torch.tensor(ids)
            labels[r, start : start + n] = torch.tensor(labs)
            labels[r, start] = IGNORE_INDEX  # see module docstring: no loss crosses a boundary
            mask[r, start : start + n] = doc_number
            positions[r, start : start + n] = torch.arange(n)
            seqlens.append(n)
            start += n
        if start < max_length:
            positions[r, start:] = torch.arange(max_length - start)
            seqlens.append(max_length - start)
    batch: dict[str, Any] = {
        "input_ids": input_ids,
        "labels": labels,
        "attention_mask": mask,
        "position_ids": positions,
    }
    if return_cu_seqlens:  # padding counted as one extra sequence per row
        batch.update(_cu_seqlens(seqlens))
    return batch


def pack_sequences(
    examples: Sequence[Any],
    max_length: int,
    *,
    pad_token_id: int = 0,
    truncate: bool = False,
    return_cu_seqlens: bool = False,
    mode: str = "indexed",
) -> dict[str, Any]:
    """Pack `examples` (token-id sequences, numpy arrays, 1D tensors, or mappings with ``input_ids`` and
    optional ``labels``) for training.

    ``mode="indexed"``: ``input_ids``, ``labels``, ``attention_mask`` (indexed: 1-based document id, 0 =
    padding, a plain tensor here) and ``position_ids`` (restarting at 0 for every document), each
    ``[rows, max_length]`` int64; with ``return_cu_seqlens`` also ``cu_seq_lens_q/k`` and ``max_length_q/k``
    (padding counted as one extra sequence per row) so varlen backends need no host sync.
    ``mode="position_ids"``: transformers' padding-free format, see the module docstring.
    Examples longer than `max_length` raise ValueError unless ``truncate=True``; token ids must be integers
    in [0, 2**63) (no float ids, nothing silently truncated). Pre-packed rows (mappings with ``input_ids``
    and ``seq_lengths`` and/or per-document ``position_ids``, from `pack_dataset`) keep their documents
    together: one output row each.
    """
    max_length = _check_max_length(max_length)
    pad_token_id = _check_int(pad_token_id, "pad_token_id", minimum=0)
    truncate = _check_flag(truncate, "truncate")
    return_cu_seqlens = _check_flag(return_cu_seqlens, "return_cu_seqlens")
    mode = _check_mode(mode)
    docs, rows = _normalise(examples, max_length, truncate)
    if mode == "position_ids":
        return _flattened(docs)
    return _rows(docs, rows, max_length, pad_token_id, return_cu_seqlens)


class PackingCollator:
    """DataLoader / Trainer ``collate_fn`` around `pack_sequences`; tracks packing efficiency over its batches.

    In the default ``mode="indexed"`` the mask is a `DocumentIdMask`: call `enable_packing(model)` before
    training, or the model refuses the batch. ``mode="position_ids"`` needs no preparation.
    """

    def __init__(
        self,
        max_length: int,
        pad_token_id: int = 0,
        *,
        truncate: bool = False,
        return_cu_seqlens: bool = False,
        mode: str = "indexed",
    ) -> None:
        if pad_token_id is None:
            raise TypeError(
                "pad_token_id must be an int, got None; PackingCollator.from_tokenizer(tokenizer, max_length) "
                "reads it from a tokenizer"
            )
        self.max_length = _check_max_length(max_length)
        self.pad_token_id = _check_int(pad_token_id, "pad_token_id", minimum=0)
        self.truncate = _check_flag(truncate, "truncate")
        self.return_cu_seqlens = _check_flag(return_cu_seqlens, "return_cu_seqlens")
        self.mode = _check_mode(mode)
        self.real_tokens = 0
        self.slots = 0
        self.last_efficiency = 0.0

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, max_length: int, **kwargs: Any) -> PackingCollator:
        """A collator padding with ``tokenizer.pad_token_id`` (ValueError when the tokenizer has none)."""
        pad = getattr(tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError(
                f"tokenizer ({type(tokenizer).__name__}) has no pad_token_id; set one first, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token"
            )
        return cls(max_length, pad, **kwargs)

    def __call__(self, examples: Sequence[Any]) -> dict[str, Any]:
        try:
            batch = pack_sequences(
                examples,
                self.max_length,
                pad_token_id=self.pad_token_id,
                truncate=self.truncate,
                return_cu_seqlens=self.return_cu_seqlens,
                mode=self.mode,
            )
        except ValueError as exc:
            if str(exc).startswith("example "):
                raise ValueError(
                    f"{exc} (position in this batch; collator.validate_dataset(dataset) names the dataset index)"
                ) from exc
            raise
        if self.mode == "indexed":
            mask = batch["attention_mask"]
            real, slots = int((mask > 0).sum()), mask.numel()
            batch["attention_mask"] = DocumentIdMask(mask)
        else:
            real = slots = batch["input_ids"].numel()
        self.real_tokens += real
        self.slots += slots
        self.last_efficiency = real / slots
        return batch

    def validate_dataset(self, dataset: Any) -> None:
        """Check every example of `dataset` (``len`` + indexing, e.g. an HF Dataset or a list) before
        training; ValueError/TypeError naming the dataset index of the first bad one."""
        if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
            raise TypeError(f"dataset must support len() and indexing, got {type(dataset).__name__}")
        for i in range(len(dataset)):
            example, where = dataset[i], f"dataset index {i}"
            if _is_packed_row(example):
                _row_documents(example, where, self.max_length)
            else:
                _document(example, where, self.max_length, self.truncate)

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots over every batch collated so far."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def __repr__(self) -> str:
        return (
            f"PackingCollator(max_length={self.max_length}, pad_token_id={self.pad_token_id}, "
            f"mode={self.mode!r}, efficiency={self.efficiency:.3f})"
        )
