"""Bin-pack tokenised examples into rows with an indexed mask, per-document positions and safe labels.

Label rule (why the *first* token of each document gets -100): transformers' causal-LM loss shifts
labels inside the loss, so the logit at position ``t`` is scored against ``labels[t + 1]``. In a packed
row the last token of document A sits right before the first token of document B; setting
``labels[first token of B] = -100`` is exactly what stops A's last position from being trained to
predict B's first token. Run alone, a document never predicts its own first token either (the shift
drops it), so the packed loss covers the same (position, target) pairs as the unpacked documents.
Padding gets -100 as well, so the last real token of a row predicts nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["PackingCollator", "first_fit_decreasing", "pack_sequences", "packing_efficiency"]

IGNORE_INDEX = -100


def _as_list(value: Any, what: str, index: int) -> list[int]:
    if isinstance(value, torch.Tensor):
        if value.ndim != 1:
            raise ValueError(f"example {index}: {what} must be 1D, got shape {tuple(value.shape)}")
        return [int(v) for v in value.tolist()]
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [int(v) for v in value]
    raise TypeError(
        f"example {index}: {what} must be a sequence of ints or a 1D tensor, got {type(value).__name__}"
    )


def _normalise(examples: Sequence[Any], max_length: int, truncate: bool) -> list[tuple[list[int], list[int]]]:
    docs: list[tuple[list[int], list[int]]] = []
    for i, example in enumerate(examples):
        if isinstance(example, Mapping):
            if "input_ids" not in example:
                raise ValueError(f"example {i} has no 'input_ids' key (keys: {sorted(example)})")
            ids = _as_list(example["input_ids"], "input_ids", i)
            labels = (
                _as_list(example["labels"], "labels", i) if example.get("labels") is not None else list(ids)
            )
            if len(labels) != len(ids):
                raise ValueError(f"example {i}: {len(labels)} labels for {len(ids)} input_ids")
        else:
            ids = _as_list(example, "input_ids", i)
            labels = list(ids)
        if not ids:
            raise ValueError(f"example {i} is empty; drop empty examples before packing")
        if len(ids) > max_length:
            if not truncate:
                raise ValueError(
                    f"example {i} has {len(ids)} tokens, more than max_length={max_length}; "
                    "pass truncate=True to cut it, or raise max_length"
                )
            ids, labels = ids[:max_length], labels[:max_length]
        docs.append((ids, labels))
    return docs


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


def packing_efficiency(batch: Mapping[str, torch.Tensor]) -> float:
    """Fraction of the row slots that hold real tokens (1.0 = no padding)."""
    mask = batch["attention_mask"]
    return float((mask > 0).sum()) / max(1, mask.numel())


def pack_sequences(
    examples: Sequence[Any],
    max_length: int,
    *,
    pad_token_id: int = 0,
    truncate: bool = False,
    return_cu_seqlens: bool = False,
) -> dict[str, torch.Tensor]:
    """Pack `examples` (token-id sequences, or mappings with ``input_ids`` and optional ``labels``) into rows.

    Returns ``input_ids``, ``labels``, ``attention_mask`` (indexed: 1-based document id, 0 = padding)
    and ``position_ids`` (restarting at 0 for every document), each ``[rows, max_length]`` int64.
    Over-long examples raise ValueError unless ``truncate=True``. With ``return_cu_seqlens`` the batch
    also carries ``cu_seq_lens_q/k`` and ``max_length_q/k`` (computed on the host, padding counted as
    one extra sequence per row) so varlen backends need no host sync at all.
    """
    if not isinstance(max_length, int) or max_length <= 0:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    docs = _normalise(examples, max_length, truncate)
    if not docs:
        raise ValueError("pack_sequences needs at least one example")
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
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": mask, "position_ids": positions}
    if return_cu_seqlens:
        cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
        cu[1:] = torch.tensor(seqlens, dtype=torch.int32).cumsum(0)
        batch.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(seqlens), max_length_k=max(seqlens))
    return batch


class PackingCollator:
    """DataLoader ``collate_fn`` around `pack_sequences`; tracks packing efficiency over its batches."""

    def __init__(
        self,
        max_length: int,
        pad_token_id: int = 0,
        *,
        truncate: bool = False,
        return_cu_seqlens: bool = False,
    ) -> None:
        if not isinstance(max_length, int) or max_length <= 0:
            raise ValueError(f"max_length must be a positive int, got {max_length!r}")
        self.max_length = max_length
        self.pad_token_id = pad_token_id
        self.truncate = truncate
        self.return_cu_seqlens = return_cu_seqlens
        self.real_tokens = 0
        self.slots = 0
        self.last_efficiency = 0.0

    def __call__(self, examples: Sequence[Any]) -> dict[str, torch.Tensor]:
        batch = pack_sequences(
            examples,
            self.max_length,
            pad_token_id=self.pad_token_id,
            truncate=self.truncate,
            return_cu_seqlens=self.return_cu_seqlens,
        )
        real = int((batch["attention_mask"] > 0).sum())
        self.real_tokens += real
        self.slots += batch["attention_mask"].numel()
        self.last_efficiency = real / batch["attention_mask"].numel()
        return batch

    @property
    def efficiency(self) -> float:
        """Real tokens / row slots over every batch collated so far."""
        return self.real_tokens / self.slots if self.slots else 0.0

    def __repr__(self) -> str:
        return f"PackingCollator(max_length={self.max_length}, pad_token_id={self.pad_token_id}, efficiency={self.efficiency:.3f})"
