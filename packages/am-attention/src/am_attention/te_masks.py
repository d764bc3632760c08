"""Classify attention masks and derive packed-sequence boundaries in O(S), once per mask object.

`detect_causal_mask` reads O(B·H·S) sampled entries of a [B, H, Sq, Sk] mask (never the S×S
block) and makes one host synchronisation. Within one forward every layer receives the same
mask object, so the dispatcher memoises the answer per object (`classify_mask_cached`): one
synchronisation per mask kind per forward, not one per layer call.

Exactness: the sampled entries decide exactly among masks of the form transformers builds —
causal band (optionally a sliding window) AND key padding AND same-document blocks. They are: the
diagonal, the first super-diagonal, each row's left band edge and the entry just outside it,
and the whole first and last rows and first column. A mask that differs from the canonical one
only at other entries (not something transformers produces) is not caught.

`document_segments` / `document_mask` build, with static shapes and no synchronisation, the exact mask of
the kernel's THD semantics, for a fallback to SDPA on a packed batch.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any

import torch

__all__ = ["detect_causal_mask"]


def _visible(values: torch.Tensor) -> torch.Tensor:
    """Boolean 'may attend' for a bool mask (True = attend) or an additive float mask (0 = attend)."""
    if values.dtype == torch.bool:
        return values
    return values > -1e4


def _sample_checks(attn_mask: torch.Tensor, left: int, doc_start: torch.Tensor | None) -> torch.Tensor | None:
    """A 0-d bool tensor: does the mask equal the causal(+window)(+document) pattern at the sampled entries."""
    if attn_mask.ndim != 4 or attn_mask.shape[-1] != attn_mask.shape[-2]:
        return None
    if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
        return None
    s = attn_mask.shape[-1]
    device = attn_mask.device
    i = torch.arange(s, device=device)
    if doc_start is None:
        start = torch.zeros(attn_mask.shape[0], s, dtype=torch.long, device=device)
    else:
        start = doc_start.to(device=device, dtype=torch.long).expand(attn_mask.shape[0], s)
    # left edge of each row's visible band: the later of the document start and the window edge
    edge = start if left < 0 else torch.maximum(start, (i - left).clamp(min=0))
    b = attn_mask.shape[0]
    rows, cols, want = [], [], []

    def add(r: torch.Tensor, c: torch.Tensor, expected: torch.Tensor | bool) -> None:
        r, c = torch.broadcast_tensors(r, c)
        rows.append(r)
        cols.append(c)
        want.append(torch.as_tensor(expected, device=device).expand(r.shape))

    ib = i.expand(b, s)
    add(ib, ib, True)  # diagonal
    if s > 1:
        add(ib[:, :-1], ib[:, :-1] + 1, False)  # first super-diagonal
    add(ib, edge, True)  # left band edge
    outside = edge - 1
    has_outside = outside >= 0
    # entry just left of the band; where there is none the clamped column is the edge itself (visible)
    add(ib, outside.clamp(min=0), ~has_outside)
    # full first row, last row and first column
    last = ib[:, -1:]
    expected_last = i >= edge[:, -1:]
    add(last.expand(b, s), ib, expected_last)
    add(torch.zeros_like(ib), ib, i.expand(b, s) == 0)
    add(ib, torch.zeros_like(ib), edge == 0)
    r = torch.cat(rows, dim=1)
    c = torch.cat(cols, dim=1)
    w = torch.cat(want, dim=1)
    if attn_mask.shape[1] == 0:
        return None
    batch_idx = torch.arange(b, device=device)[:, None]
    got = _visible(attn_mask[batch_idx, :, r, c])  # [B, N, H]: advanced indices first, then the head slice
    return (got == w[:, :, None]).all()


def detect_causal_mask(
    attn_mask: torch.Tensor, window_size: tuple[int, int] = (-1, 0)
) -> tuple[str, tuple[int, int]] | None:
    """Map a 4D HF mask to TE's `("causal", window_size)` when it is pure causal or causal+sliding, else None.

    Accepts bool masks (True = attend) and additive float masks (0 = attend, large negative =
    masked). Returns None for padding, packed documents, non-square or non-causal patterns.
    O(B·H·S) work and one host synchronisation; see the module docstring for what is sampled.
    """
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, got {type(attn_mask).__name__}")
    window_size = _check_window(window_size)
    left = window_size[0]
    if attn_mask.ndim == 4 and attn_mask.shape[-1] and left >= attn_mask.shape[-1] - 1:
        left = -1  # the window covers every key: the mask is plain causal
    ok = _sample_checks(attn_mask, left, None)
    if ok is None or not bool(ok):
        return None
    return "causal", window_size


def _check_window(window_size: object) -> tuple[int, int]:
    """TE's `(left, right)` window: two ints >= -1."""
    if (
        not isinstance(window_size, (tuple, list))
        or len(window_size) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)
    ):
        raise ValueError(
            f"window_size must be a pair of ints >= -1 (TE's (left, right)), got {window_size!r}"
        )
    return int(window_size[0]), int(window_size[1])


class PackedInfo:
    """THD boundaries of a packed batch: token indices kept, int32 cu_seqlens and the longest document."""

    __slots__ = ("cu_seqlens", "indices", "max_seqlen", "total")

    def __init__(self, cu_seqlens: torch.Tensor, indices: torch.Tensor | None, max_seqlen: int, total: int):
        self.cu_seqlens = cu_seqlens
        self.indices = indices  # None when every token of the flattened batch is kept
        self.max_seqlen = max_seqlen
        self.total = total  # B * S of the padded batch


def _cu_from_starts(starts: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    cu = torch.cat([starts.to(torch.int32), torch.tensor([n], dtype=torch.int32, device=starts.device)])
    max_seqlen = int((cu[1:] - cu[:-1]).max().item()) if cu.numel() > 1 else 0
    return cu, max_seqlen


def cu_seqlens_from_position_ids(position_ids: torch.Tensor) -> PackedInfo | None:
    """Documents of a [B, S] `position_ids` (a new one wherever the position does not grow by 1); None when unpacked."""
    if position_ids.ndim != 2:
        return None
    b, s = position_ids.shape
    new_doc = torch.ones(b, s, dtype=torch.bool, device=position_ids.device)
    new_doc[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1]) != 1
    starts = new_doc.reshape(-1).nonzero().reshape(-1)
    if starts.numel() == b:  # one document per row: an ordinary batch
        return None
    cu, max_seqlen = _cu_from_starts(starts, b * s)
    return PackedInfo(cu, None, max_seqlen, b * s)


def cu_seqlens_from_indexed_mask(mask: torch.Tensor) -> PackedInfo:
    """Documents of an indexed [B, S] mask (1-based document ids, 0 = padding); padding tokens are dropped."""
    if mask.ndim != 2 or mask.dtype.is_floating_point or mask.dtype == torch.bool:
        raise ValueError(
            f"indexed attention_mask must be an integer [B, S] tensor, got {mask.dtype} {tuple(mask.shape)}"
        )
    b, s = mask.shape
    flat = mask.reshape(-1).to(torch.long)
    if flat.numel() and int(flat.min()) < 0:
        raise ValueError("indexed attention_mask holds negative document ids (1-based ids, 0 = padding)")
    keep = flat > 0
    indices = keep.nonzero().reshape(-1)
    row = torch.arange(b, device=mask.device).repeat_interleave(s)
    doc_key = (row * (int(s) + 1) + flat)[indices]
    is_start = torch.ones_like(doc_key, dtype=torch.bool)
    is_start[1:] = doc_key[1:] != doc_key[:-1]
    starts = is_start.nonzero().reshape(-1)
    cu, max_seqlen = _cu_from_starts(starts, int(indices.numel()))
    return PackedInfo(cu, None if indices.numel() == b * s else indices, max_seqlen, b * s)


class _ObjectMemo:
    """Results keyed by tensor identity and version counter, dropped when the tensor dies."""

    def __init__(self, limit: int = 64) -> None:
        self._entries: dict[tuple[int, int, Any], tuple[Any, Any]] = {}
        self._lock = threading.Lock()
        self._limit = limit

    def get_or_compute(self, tensor: torch.Tensor, extra: Any, compute: Any) -> Any:
        key = (id(tensor), tensor._version, extra)
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None and hit[0]() is tensor:
                return hit[1]
        value = compute()
        with self._lock:
            if len(self._entries) >= self._limit:
                self._entries = {k: v for k, v in self._entries.items() if v[0]() is not None}
                if len(self._entries) >= self._limit:
                    self._entries.clear()
            self._entries[key] = (weakref.ref(tensor), value)
        return value


_MASK_MEMO = _ObjectMemo()
_PACKED_MEMO = _ObjectMemo()


def classify_mask_cached(attn_mask: torch.Tensor, window_size: tuple[int, int]) -> bool:
    """`detect_causal_mask(...) is not None`, computed once per mask object and window."""
    return _MASK_MEMO.get_or_compute(
        attn_mask, tuple(window_size), lambda: detect_causal_mask(attn_mask, window_size) is not None
    )


def packed_info_cached(source: torch.Tensor, kind: str, batch: int) -> PackedInfo | None:
    """Packed boundaries from `position_ids` (kind "position_ids") or an indexed mask (kind "indexed"), memoised."""
    if kind == "position_ids":
        return _PACKED_MEMO.get_or_compute(
            source, (kind, batch), lambda: cu_seqlens_from_position_ids(source.expand(batch, -1))
        )
    return _PACKED_MEMO.get_or_compute(source, (kind, batch), lambda: cu_seqlens_from_indexed_mask(source))


def packed_mask_matches(attn_mask: torch.Tensor, kind: str, source: torch.Tensor, left: int) -> bool:
    """Whether a 4D mask is the block-causal mask of the documents of `source` (see `document_segments`;
    sampled, memoised)."""

    def compute() -> bool:
        b, s = attn_mask.shape[0], attn_mask.shape[-1]
        if kind != "cu" and source.shape[-1] != s:
            return False
        seg, _ = document_segments(kind, source, b, s)
        i = torch.arange(s, device=seg.device)
        new_doc = torch.ones_like(seg, dtype=torch.bool)
        new_doc[:, 1:] = seg[:, 1:] != seg[:, :-1]
        start = torch.where(new_doc, i, torch.zeros_like(i)).cummax(dim=1).values
        eff_left = -1 if left >= s - 1 else left
        ok = _sample_checks(attn_mask, eff_left, start)
        return ok is not None and bool(ok)

    return _MASK_MEMO.get_or_compute(attn_mask, ("packed", kind, id(source), source._version, left), compute)


def cu_seqlens_from_kwargs(cu_seqlens: torch.Tensor, total: int, max_length: Any) -> PackedInfo:
    """Boundaries passed as `cu_seq_lens_q/k` (transformers' flattened-batch kwargs), validated against `total` tokens."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.ndim != 1 or cu_seqlens.is_floating_point():
        raise ValueError(f"cu_seq_lens_q must be a 1D integer tensor, got {cu_seqlens!r}")
    cu = cu_seqlens.to(torch.int32)
    lengths = cu[1:] - cu[:-1]
    first, last, shortest = (
        torch.stack([cu[0], cu[-1], lengths.min()]).tolist() if cu.numel() > 1 else (0, 0, 0)
    )
    if cu.numel() < 2 or first != 0 or shortest < 0 or last != total:
        raise ValueError(
            f"cu_seq_lens_q must rise from 0 to the {total} tokens of the batch, got {cu_seqlens.tolist()}"
        )
    max_seqlen = int(max_length) if max_length is not None else int(lengths.max())
    return PackedInfo(cu, None, max_seqlen, total)


def cu_info_cached(cu_seqlens: torch.Tensor, total: int, max_length: Any) -> PackedInfo:
    """`cu_seqlens_from_kwargs`, memoised per tensor (one host synchronisation per forward)."""
    key = ("cu", total, max_length if isinstance(max_length, int) else None)
    return _PACKED_MEMO.get_or_compute(
        cu_seqlens, key, lambda: cu_seqlens_from_kwargs(cu_seqlens, total, max_length)
    )


def document_segments(
    kind: str, source: torch.Tensor, batch: int, seq: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token document index and 'is a real token' flag, both [B, S], from one of the packed-batch sources.

    kind "position_ids": a new document wherever the position does not grow by 1; "indexed": runs of equal
    1-based ids (0 = padding); "cu": `cu_seqlens` over the flattened batch (tokens past the last boundary are
    padding). Static shapes and no host synchronisation.
    """
    device = source.device
    if kind == "cu":
        pos = torch.arange(batch * seq, device=device)
        bounds = source.to(device=device, dtype=torch.long)
        seg = torch.searchsorted(bounds[1:], pos, right=True).view(batch, seq)
        return seg, (pos < bounds[-1]).view(batch, seq)
    values = source.to(torch.long).expand(batch, seq)
    step = values[:, 1:] - values[:, :-1]
    change = (step != 1) if kind == "position_ids" else (step != 0)
    seg = torch.cat([torch.zeros_like(values[:, :1]), change.to(torch.long)], dim=1).cumsum(1)
    valid = torch.ones_like(values, dtype=torch.bool) if kind == "position_ids" else values > 0
    return seg, valid


def document_mask(seg: torch.Tensor, valid: torch.Tensor, causal: bool, left: int) -> torch.Tensor:
    """Bool [B, 1, S, S] mask (True = attend) of the kernel's THD semantics: same document, real keys, causal and
    `left`-token window when asked. Padding queries attend only to themselves (their output is zeroed after)."""
    s = seg.shape[1]
    i = torch.arange(s, device=seg.device)
    allowed = (seg[:, :, None] == seg[:, None, :]) & valid[:, None, :]
    if causal:
        allowed &= i[None, None, :] <= i[None, :, None]
    if left >= 0:
        allowed &= i[None, None, :] >= i[None, :, None] - left
    own = torch.eye(s, dtype=torch.bool, device=seg.device)[None]
    allowed = torch.where(valid[:, :, None], allowed, own)
    return allowed[:, None]
