"""Indexed packing masks: validation, per-document lengths and varlen unpadding data.

An indexed packing mask is an integer tensor of shape ``[B, S]``. Row ``b`` holds the 1-based index of
the document each token belongs to, restarting at 1 in every row, and 0 for padding, which may only
follow the last document of a row: ``[[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]]``. A plain 0/1 (or bool)
padding mask is the special case of at most one document per row.

Everything here is vectorised: no Python loop over documents, and at most one host synchronisation per
call (one small device-to-host copy that carries the document count, the non-padding token count, the
longest document and a validity flag together).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .marker import DocumentIdMask, as_plain

__all__ = [
    "UnpadData",
    "document_ids_from_position_ids",
    "get_seqlens_in_batch",
    "get_unpad_data",
    "is_indexed_packed_mask",
    "validate_indexed_mask",
]


class UnpadData(NamedTuple):
    """What varlen attention kernels need: token gather indices, int32 ``cu_seqlens`` and the longest document."""

    indices: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int


def _check_layout(attention_mask: object) -> torch.Tensor:
    """Host-side checks (no sync): a non-empty 2D integer or bool tensor with values (not on the meta device)."""
    attention_mask = as_plain(attention_mask)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
    if attention_mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be 2D [batch, seq_len] with 1-based document ids, got ndim="
            f"{attention_mask.ndim} (shape {tuple(attention_mask.shape)})"
        )
    if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
        raise ValueError(
            f"attention_mask must have an integer or bool dtype (document ids), got {attention_mask.dtype}; "
            "a float mask is an additive bias, not an indexed packing mask"
        )
    if attention_mask.is_meta:
        raise ValueError("attention_mask is on the meta device: it has no values to read document ids from")
    if attention_mask.numel() == 0:
        raise ValueError(
            f"attention_mask is empty (shape {tuple(attention_mask.shape)}): there are no tokens"
        )
    return attention_mask


def _violations(ids: torch.Tensor) -> torch.Tensor:
    """Bool [B, S]: True where the indexed-mask rules break (computed on device, no sync).

    Rules per row: the first token is 1 or 0; every next token repeats the previous id, increments it by
    exactly one, or is padding (0); after padding only padding follows; no id is negative.
    """
    prev = F.pad(ids[:, :-1], (1, 0), value=0)
    same = ids == prev
    step = ids == prev + 1
    pad_after_pad_or_end = ids == 0
    ok = (same | step | pad_after_pad_or_end) & (ids >= 0)
    # padding followed by a token: prev == 0 at a non-first column and ids > 0
    col = torch.arange(ids.shape[1], device=ids.device)
    resumed = (prev == 0) & (ids > 0) & (col > 0)
    return ~ok | resumed


def _describe_violation(ids: torch.Tensor, bad: torch.Tensor) -> str:
    """Error text naming the first bad row and position (error path: syncs freely)."""
    row, pos = (int(v) for v in bad.nonzero()[0].tolist())
    value = int(ids[row, pos])
    prev = int(ids[row, pos - 1]) if pos > 0 else None
    if value < 0:
        why = f"negative document id {value}"
    elif prev is None:
        why = f"a row must start with document 1 (or padding 0), found {value}"
    elif prev == 0 and value > 0:
        why = f"padding followed by a token (id {value} after 0); padding may only end a row"
    elif value < prev:
        why = f"document id decreases from {prev} to {value}"
    else:
        why = f"document id skips from {prev} to {value} (ids must grow by exactly 1)"
    snippet = ids[row, max(0, pos - 3) : pos + 3].tolist()
    return f"attention_mask: invalid indexed packing mask at row {row}, position {pos}: {why}; row excerpt {snippet}"


def validate_indexed_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Raise ValueError naming row and position if `attention_mask` is not a valid indexed packing mask."""
    ids = _check_layout(attention_mask).to(torch.int64)
    bad = _violations(ids)
    if bool(bad.any()):
        raise ValueError(_describe_violation(ids, bad))
    return attention_mask


def is_indexed_packed_mask(attention_mask: torch.Tensor | None) -> bool:
    """True iff `attention_mask` is a 2D integer mask holding some id > 1, i.e. packs several documents in a row.

    A 0/1 or bool padding mask, None, a non-tensor, a float, complex, empty or meta-device mask, or a 4D mask
    is not one (returns False, never raises). One host sync (the max).
    """
    attention_mask = as_plain(attention_mask)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.ndim != 2:
        return False
    dtype = attention_mask.dtype
    if dtype == torch.bool or dtype.is_floating_point or dtype.is_complex:
        return False
    if attention_mask.numel() == 0 or attention_mask.is_meta:
        return False
    return bool(attention_mask.max() > 1)


def needs_a_look(mask: object) -> bool:
    """Model-input masks that packing code inspects: marked ones, and non-bool masks other than 4D ones."""
    if isinstance(mask, DocumentIdMask):
        return True
    return isinstance(mask, torch.Tensor) and mask.ndim != 4 and mask.dtype != torch.bool


def packs_documents(mask: torch.Tensor, input_shape: tuple[int, ...] | None) -> bool:
    """Whether a model's 2D `mask` packs several documents per row (one host sync); ValueError if it would
    be misread.

    Refused: a mask that is not 2D (an integer 3D mask, ...), a float mask holding anything but 0/1 (document
    ids in the wrong dtype, which transformers would read as padding), an invalid indexed mask, and an indexed
    mask whose shape is not `input_shape` (``[batch, seq_len]`` of input_ids / inputs_embeds). 0/1 masks of
    any dtype keep transformers' meaning (False).
    """
    if mask.ndim != 2:
        raise ValueError(
            f"attention_mask must be a 2D [batch, seq_len] mask (0/1 padding or indexed packing) or a 4D mask, "
            f"got shape {tuple(mask.shape)} ({mask.dtype})"
        )
    if mask.numel() == 0 or mask.is_meta:
        return False
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError(
                f"attention_mask has dtype {mask.dtype} and values other than 0 and 1: an indexed packing mask "
                "(document ids) must be an integer tensor, and a float one would be read as a padding mask "
                "that lets documents attend to each other"
            )
        return False
    stats = torch.stack([mask.max(), mask.min()]).tolist()
    if stats[0] <= 1 and stats[1] >= 0:  # plain 0/1 padding mask: transformers' own behaviour
        return False
    validate_indexed_mask(mask)
    if input_shape is not None and tuple(mask.shape) != tuple(input_shape):
        raise ValueError(
            f"attention_mask of shape {tuple(mask.shape)} does not match the input of shape {tuple(input_shape)} "
            "(input_ids / inputs_embeds): an indexed packing mask needs one document id per token"
        )
    return True


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Indexed mask (no padding) from per-document ``position_ids``: a document starts where the position
    does not continue the previous one by +1, and at column 0."""
    if not isinstance(position_ids, torch.Tensor):
        raise TypeError(f"position_ids must be a torch.Tensor, got {type(position_ids).__name__}")
    if (
        position_ids.dtype.is_floating_point
        or position_ids.dtype.is_complex
        or position_ids.dtype == torch.bool
    ):
        raise ValueError(f"position_ids must have an integer dtype, got {position_ids.dtype}")
    if position_ids.ndim == 1:
        position_ids = position_ids.unsqueeze(0)
    if position_ids.ndim != 2:
        raise ValueError(f"position_ids must be [batch, seq_len], got shape {tuple(position_ids.shape)}")
    prev = F.pad(position_ids[:, :-1], (1, 0), value=0)
    starts = position_ids != prev + 1
    starts[:, 0] = True
    return starts.to(torch.int32).cumsum(-1, dtype=torch.int32)


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """Position of each token inside its document (0-based, int64 ``[B, S]``) of a valid indexed mask."""
    col = torch.arange(document_ids.shape[-1], device=document_ids.device).expand_as(document_ids)
    prev = F.pad(document_ids[:, :-1], (1, 0), value=-1)
    starts = torch.where(document_ids != prev, col, torch.zeros_like(col))
    return col - starts.cummax(dim=-1).values


class _Stats(NamedTuple):
    lengths: torch.Tensor  # [B*S] per-document lengths in order, valid in [:num_docs]
    valid: torch.Tensor  # [B*S] bool, non-padding tokens
    num_docs: int
    num_tokens: int
    max_seqlen: int
    max_id: int


def _stats(attention_mask: torch.Tensor, *, strict: bool, max_seqlen: int | None) -> _Stats:
    ids = _check_layout(attention_mask).to(torch.int64)
    batch, seq = ids.shape
    flat = ids.reshape(-1)
    valid = flat > 0
    # A document starts at a valid token whose id exceeds every id before it in the row. For indexed
    # masks that is "the id changed"; for a 0/1 mask it is "first valid token of the row", so left
    # padding and transformers' own 0/1 masks keep their original meaning.
    prev_max = F.pad(ids[:, :-1], (1, 0), value=0).cummax(dim=-1).values.reshape(-1)
    starts = valid & (flat > prev_max)
    doc_of_token = starts.cumsum(0) - 1  # global document index of each token (valid tokens only)
    lengths = torch.zeros(batch * seq, dtype=torch.int64, device=ids.device)
    lengths.scatter_add_(0, doc_of_token.clamp_min(0), valid.to(torch.int64))
    bad = _violations(ids).any() if strict else (flat < 0).any()
    zero = flat.new_zeros(())
    extrema = [flat.max(), flat.min()] if flat.numel() else [zero, zero]
    parts = [starts.sum(), valid.sum(), *extrema, bad.to(torch.int64)]
    if max_seqlen is None:
        parts.append(lengths.max() if lengths.numel() else lengths.new_zeros(()))
    host = torch.stack(parts).tolist()  # the one host sync
    num_docs, num_tokens, max_id, min_id, is_bad = (int(v) for v in host[:5])
    # 0/1 masks keep transformers' meaning (left padding is fine); negative ids are never valid
    if is_bad and (max_id > 1 or min_id < 0):
        raise ValueError(_describe_violation(ids, _violations(ids)))
    found_max = int(host[5]) if max_seqlen is None else int(max_seqlen)
    return _Stats(lengths, valid, num_docs, num_tokens, found_max, max_id)


def get_seqlens_in_batch(attention_mask: torch.Tensor) -> torch.Tensor:
    """All document lengths of an indexed mask, row by row, as a 1D int32 tensor.

    >>> get_seqlens_in_batch(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]]))
    tensor([2, 3, 1, 2, 3], dtype=torch.int32)
    """
    st = _stats(attention_mask, strict=True, max_seqlen=0)
    return st.lengths[: st.num_docs].to(torch.int32)


def get_unpad_data(
    attention_mask: torch.Tensor, *, max_seqlen: int | None = None, strict: bool = True
) -> UnpadData:
    """``(indices, cu_seqlens int32, max_seqlen int)`` for varlen attention over an indexed mask.

    Drop-in for ``transformers.modeling_flash_attention_utils._get_unpad_data`` that treats every
    document id as its own sequence. ``indices`` are the non-padding positions of the flattened mask,
    ``cu_seqlens`` the cumulative document lengths (``[0, l0, l0+l1, ...]``). Passing `max_seqlen`
    skips the max reduction. With ``strict`` (default) an invalid indexed mask raises ValueError naming
    row and position; 0/1 masks are always accepted as in transformers (left padding included).

    >>> get_unpad_data(torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]]))
    UnpadData(indices=tensor([ 0,  1,  2,  3,  4,  6,  7,  8,  9, 10, 11]), cu_seqlens=tensor([ 0,  2,  5,  6,  8, 11], dtype=torch.int32), max_seqlen=3)
    """
    if max_seqlen is not None and (
        isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0
    ):
        kind = TypeError if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) else ValueError
        raise kind(f"max_seqlen must be None or a non-negative int, got {max_seqlen!r}")
    if not isinstance(strict, bool):
        raise TypeError(f"strict must be a bool, got {strict!r}")
    st = _stats(attention_mask, strict=strict, max_seqlen=max_seqlen)
    cu_seqlens = F.pad(st.lengths[: st.num_docs].cumsum(0, dtype=torch.int32), (1, 0))
    # nonzero_static with a host-known size does not synchronise again
    indices = torch.nonzero_static(st.valid, size=st.num_tokens).reshape(-1)
    return UnpadData(indices, cu_seqlens, st.max_seqlen)
