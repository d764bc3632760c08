"""One packed-attention path per backend.

- sdpa / eager / flex_attention: the indexed mask becomes transformers' own
  ``packed_sequence_mask_function`` (same document), intersected by its mask builders with causal (and
  sliding-window) masking: a block-diagonal causal (sliding) mask in the backend's own format (4D bool,
  4D float, BlockMask). That part lives with the builders' pass-throughs (`patches`) and `scoped`.
- flash_attention_2/3: transformers unpads with ``_get_unpad_data``; our replacement returns one
  sequence per document (`flash_unpad_data`).
- torch_varlen: torch's own ``torch.nn.attention.varlen.varlen_attn`` registered as a transformers
  attention backend (`register_varlen_attention`), so packed training needs no flash-attn install.

Unpadding data is cached per mask object (the same mask tensor reaches every layer), so the one host
sync happens once per forward, in mask creation, never per layer. For torch_varlen the mask entry hands
the layers the batch's `Segments` themselves (tensors and an int, no lookup), so a decoder layer under
``torch.compile`` traces the attention call without a graph break.
"""

from __future__ import annotations

import inspect
import math
import threading
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ._contract import contract_error, import_module_checked, require_parameters
from ._originals import MASK_BUILDERS, unpatched_builder
from ._patch import GlobalPatch, ItemPatch, PatchSet, mark
from ._probes import probe_mask_interface_call
from .mask import UnpadData, document_ids_from_position_ids, get_unpad_data

__all__ = [
    "VARLEN_ATTN_IMPLEMENTATION",
    "flash_unpad_data",
    "register_varlen_attention",
    "unregister_varlen_attention",
    "varlen_attention_forward",
    "varlen_kernel",
]

VARLEN_ATTN_IMPLEMENTATION = "torch_varlen"


# --------------------------------------------------------------------------- unpad cache
_local = threading.local()


def cached_unpad_data(mask: torch.Tensor, *, strict: bool = True) -> UnpadData:
    """`get_unpad_data(mask)`, memoised on the mask object (and its version counter) for this thread."""
    slot = getattr(_local, "slot", None)
    if slot is not None:
        ref, version, data = slot
        if ref() is mask and version == mask._version:
            return data
    data = get_unpad_data(mask, strict=strict)
    _local.slot = (weakref.ref(mask), mask._version, data)
    return data


def clear_unpad_cache() -> None:
    _local.slot = None
    _seg_local.slot = None


class Segments(NamedTuple):
    """Every token of the flattened batch in one varlen sequence: each document, and each run of padding.

    What the torch_varlen mask entry returns to the decoder layers in place of the 2D mask.
    """

    cu_seqlens: torch.Tensor  # int32, [num_segments + 1], ends at B * S
    max_seqlen: int
    valid: torch.Tensor | None  # [B*S, 1, 1] bool, False on padding; None when there is none
    shape: tuple[int, int]  # (B, S) of the mask the segments were cut from


_seg_local = threading.local()


def cached_segments(mask: torch.Tensor) -> Segments:
    """`mask`'s segments (validated as `get_unpad_data` does), memoised like `cached_unpad_data`.

    Attention over segments needs no gather/scatter of q/k/v: padding runs attend only among themselves,
    so real tokens see exactly their document, and the padding outputs are zeroed afterwards.
    """
    slot = getattr(_seg_local, "slot", None)
    if slot is not None and slot[0]() is mask and slot[1] == mask._version:
        return slot[2]
    data = cached_unpad_data(mask)  # validates the indexed mask (one host sync)
    ids = mask.to(torch.int64)
    batch, seq = ids.shape
    start = torch.ones(batch, seq, dtype=torch.bool, device=ids.device)
    start[:, 1:] = ids[:, 1:] != ids[:, :-1]
    starts = start.reshape(-1).nonzero().reshape(-1)
    end = torch.tensor([batch * seq], device=ids.device)
    cu = torch.cat([starts, end]).to(torch.int32)
    padded = data.indices.numel() != batch * seq
    # every document is a segment, so the longest segment covers the longest document
    valid = (ids > 0).reshape(-1, 1, 1) if padded else None
    segments = Segments(cu, int((cu[1:] - cu[:-1]).max()), valid, (batch, seq))
    # the segment count changes from batch to batch: a compiled layer should not specialise on it
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    _seg_local.slot = (weakref.ref(mask), mask._version, segments)
    return segments


def flash_unpad_data(attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Replacement for transformers' ``_get_unpad_data``: one varlen sequence per document id."""
    return tuple(cached_unpad_data(attention_mask))  # type: ignore[return-value]


# --------------------------------------------------------------------------- varlen kernel
_KERNEL_PARAMS: frozenset[str] | None = None


def _varlen_attn() -> Callable[..., Any]:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError as exc:
        raise ImportError(
            f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn (needs torch>=2.10); "
            "use attn_implementation='flex_attention' or 'sdpa', or install flash-attn "
            '(pip install "am-packing[flash-attn]")'
        ) from exc
    return varlen_attn


def varlen_kernel(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    scale: float,
    window_left: int,
    causal: bool,
) -> torch.Tensor:
    """Call torch's varlen attention on ``[T, H, D]`` tensors, adapting to the installed torch's signature.

    torch 2.10 takes ``is_causal``; 2.11 adds ``scale`` and ``window_size``; 2.12 adds ``enable_gqa``.
    ``window_left`` is the number of earlier tokens a query may see (-1: unlimited).
    """
    global _KERNEL_PARAMS
    fn = _varlen_attn()
    if _KERNEL_PARAMS is None:
        _KERNEL_PARAMS = frozenset(inspect.signature(fn).parameters)
    params = _KERNEL_PARAMS
    kwargs: dict[str, Any] = {}
    n_rep = query.shape[1] // key.shape[1]
    if n_rep > 1:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:
            key = key.repeat_interleave(n_rep, dim=1)
            value = value.repeat_interleave(n_rep, dim=1)
    if "scale" in params:
        kwargs["scale"] = scale
    elif not math.isclose(scale, query.shape[-1] ** -0.5, rel_tol=1e-6):
        query = query * (scale * query.shape[-1] ** 0.5)  # default kernel scale is 1/sqrt(D)
    if "window_size" in params:
        kwargs["window_size"] = (window_left, 0) if causal else (-1, -1)
    else:
        if window_left >= 0:
            raise ValueError(
                f"torch {torch.__version__} varlen_attn has no window_size argument, so sliding-window layers "
                "cannot be packed exactly with torch_varlen; use torch>=2.11, flex_attention or sdpa"
            )
        kwargs["is_causal"] = causal
    return fn(query, key, value, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


def _varlen_layout(
    attention_mask: Segments | torch.Tensor | None,
    kwargs: dict[str, Any],
    batch: int,
    seq: int,
    device: torch.device,
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(padding mask to zero the output with or None, cu_seqlens, max_seqlen) over all B*S tokens for this
    batch; never syncs on the cached paths."""
    if isinstance(attention_mask, Segments):  # from `varlen_mask`: computed once for this forward
        if attention_mask.shape != (batch, seq):
            raise ValueError(
                f"torch_varlen segments were cut from a [{attention_mask.shape[0]}, {attention_mask.shape[1]}] "
                f"mask but the attention input is [{batch}, {seq}]"
            )
        return attention_mask.valid, attention_mask.cu_seqlens, attention_mask.max_seqlen
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:  # precomputed by the caller (PackingCollator(return_cu_seqlens=True)): zero syncs
        max_q = kwargs.get("max_length_q")
        if max_q is None:
            raise ValueError("cu_seq_lens_q was passed without max_length_q; pass both")
        return None, cu.to(device=device, dtype=torch.int32), int(max_q)
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(
                f"torch_varlen expects a 2D (indexed or 0/1) attention mask, got shape {tuple(attention_mask.shape)}"
            )
        segments = cached_segments(attention_mask)
        return segments.valid, segments.cu_seqlens, segments.max_seqlen
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and position_ids.shape[-1] == seq:
        ids = _cached_position_documents(position_ids.expand(batch, -1))
        data = cached_unpad_data(ids)
        return None, data.cu_seqlens, data.max_seqlen
    cu = torch.arange(0, (batch + 1) * seq, seq, dtype=torch.int32, device=device)
    return None, cu, seq


_pos_local = threading.local()


def _cached_position_documents(position_ids: torch.Tensor) -> torch.Tensor:
    slot = getattr(_pos_local, "slot", None)
    if slot is not None and slot[0]() is position_ids and slot[1] == position_ids._version:
        return slot[2]
    ids = document_ids_from_position_ids(position_ids)
    _pos_local.slot = (weakref.ref(position_ids), position_ids._version, ids)
    return ids


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function running torch's varlen attention per document.

    Inputs are ``[B, H, S, D]``; the output is ``[B, S, H, D]`` like every transformers backend. Padding
    positions come back as zeros.
    """
    if dropout:
        raise ValueError(
            f"torch_varlen attention has no dropout; got dropout={dropout} (set attention_dropout=0)"
        )
    if softcap is not None:
        raise ValueError(f"torch_varlen attention has no logit softcapping; got softcap={softcap}")
    if kwargs.get("s_aux") is not None:
        raise ValueError("torch_varlen attention does not support attention sinks (s_aux)")
    batch, heads, seq, dim = query.shape
    if key.shape[2] != seq:
        raise ValueError(
            f"torch_varlen needs equal query and key lengths (training, no KV cache); got {seq} and {key.shape[2]}"
        )
    causal = kwargs.get("is_causal")
    causal = bool(getattr(module, "is_causal", True) if causal is None else causal)
    scale = float(dim**-0.5 if scaling is None else scaling)
    # transformers' sliding_window counts the query itself: kv_idx > q_idx - sliding_window
    window_left = int(sliding_window) - 1 if sliding_window else -1
    valid, cu_seqlens, max_seqlen = _varlen_layout(attention_mask, kwargs, batch, seq, query.device)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)

    out = varlen_kernel(
        flat(query),
        flat(key),
        flat(value),
        cu_seqlens,
        max_seqlen,
        scale=scale,
        window_left=window_left,
        causal=causal,
    )
    if valid is not None:
        out = out * valid
    return out.view(batch, seq, heads, dim), None


def varlen_mask(
    *args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any
) -> Segments | torch.Tensor | None:
    """AttentionMaskInterface entry for torch_varlen: a 2D mask becomes its `Segments`, once per forward
    (the host syncs happen here, not in a layer; a compiled layer receives plain tensors and an int)."""
    if attention_mask is not None and attention_mask.ndim == 2:
        kv_length = kwargs.get("kv_length")
        if isinstance(kv_length, int) and attention_mask.shape[-1] > kv_length:
            attention_mask = attention_mask[:, -kv_length:]
        return cached_segments(attention_mask)
    return attention_mask


mark(varlen_attention_forward, "am_packing.varlen_attention_forward")
mark(flash_unpad_data, "am_packing.flash_unpad_data")
mark(varlen_mask, "am_packing.varlen_mask")


# --------------------------------------------------------------------------- registration
_MASK_KEYWORDS = ("attention_mask", "kv_length")


def _check_registries(value: Any) -> None:
    import transformers

    masking = import_module_checked("transformers.masking_utils")
    for owner, what in (
        (transformers.AttentionInterface, "transformers.AttentionInterface"),
        (masking.AttentionMaskInterface, "transformers.masking_utils.AttentionMaskInterface"),
    ):
        if not isinstance(getattr(owner, "_global_mapping", None), dict):
            raise contract_error(what, "has no dict _global_mapping registry to register torch_varlen in")
    require_parameters(transformers.AttentionInterface._global_mapping["sdpa"], ["module", "query"])
    # varlen_mask reads `attention_mask` and `kv_length` as keywords: the sdpa entry is the reference
    # signature of the mask interface, and the builders must call it that way (a behaviour probe).
    sdpa_mask = masking.AttentionMaskInterface._global_mapping.get("sdpa")
    _require_keywords(sdpa_mask, _MASK_KEYWORDS, "transformers.masking_utils.AttentionMaskInterface['sdpa']")
    for builder in MASK_BUILDERS:
        probe_mask_interface_call(masking, builder, unpatched_builder(masking, builder), _MASK_KEYWORDS)


def _require_keywords(func: Any, names: tuple[str, ...], what: str) -> None:
    """`func` accepts each of `names` as a keyword (a named, non-positional-only parameter, or **kwargs)."""
    sig = require_parameters(func, names, what)
    positional_only = [
        n
        for n in names
        if n in sig.parameters and sig.parameters[n].kind is inspect.Parameter.POSITIONAL_ONLY
    ]
    if positional_only:
        raise contract_error(what, f"parameters {positional_only} became positional-only in {sig}")


def check_backend_name(name: Any, argument: str = "name") -> str:
    """A usable new ``attn_implementation`` name, or TypeError/ValueError naming `argument`.

    transformers reads meaning into some names (a ``paged|`` prefix; ``flash`` anywhere turns on its
    flash-attention code paths), so those are refused along with empty and non-string names.
    """
    if not isinstance(name, str):
        raise TypeError(f"{argument} must be a str (an attn_implementation name), got {type(name).__name__}")
    if not name or name != name.strip():
        raise ValueError(f"{argument} must be a non-empty name without surrounding spaces, got {name!r}")
    if name.startswith("paged|") or "flash" in name:
        raise ValueError(
            f"{argument}={name!r}: transformers gives names with a 'paged|' prefix or containing 'flash' a "
            "meaning of their own; choose another name"
        )
    return name


def _registration(name: str) -> PatchSet:
    import transformers

    masking = import_module_checked("transformers.masking_utils")
    registries = (
        (transformers.AttentionInterface._global_mapping, varlen_attention_forward, "AttentionInterface"),
        (masking.AttentionMaskInterface._global_mapping, varlen_mask, "AttentionMaskInterface"),
    )
    for registry, ours, label in registries:
        taken = registry.get(name)
        if taken is not None and taken is not ours:
            raise ValueError(
                f"name={name!r} is already registered in transformers' {label} (as {taken!r}); registering "
                "torch varlen attention under it would change that backend for every model. Choose a new name"
            )
    return PatchSet(
        [
            ItemPatch(
                registries[0][0],
                name,
                varlen_attention_forward,
                contract=_check_registries,
                label="AttentionInterface",
            ),
            ItemPatch(registries[1][0], name, varlen_mask, label="AttentionMaskInterface"),
        ],
        name=f"am_packing.register_varlen_attention({name!r})",
    )


_VARLEN = GlobalPatch(_registration)


def register_varlen_attention(name: str = VARLEN_ATTN_IMPLEMENTATION) -> PatchSet:
    """Register torch varlen attention as ``attn_implementation=name`` (attention + mask interfaces).

    Idempotent for the same name; returns the handle (``.revert()``, context manager). A name transformers
    already has (``"sdpa"``, ...) is refused, and so is a second name while one is registered. Undo:
    `unregister_varlen_attention`. Needs torch>=2.10 at call time of the attention, and a CUDA device for
    the kernel itself.
    """
    check_backend_name(name)
    active = _VARLEN.active
    if active is not None and active.patches[0].attr != name:
        raise ValueError(
            f"torch varlen attention is already registered as {active.patches[0].attr!r}; "
            f"call unregister_varlen_attention() before registering it as name={name!r}"
        )
    return _VARLEN.apply(name)


def unregister_varlen_attention() -> None:
    """Remove the torch_varlen registration (no-op when not registered)."""
    _VARLEN.revert()
