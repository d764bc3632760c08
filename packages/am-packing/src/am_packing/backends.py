"""One packed-attention path per backend.

- sdpa / eager / flex_attention: the indexed mask becomes an ``and_mask_function`` (same document) that
  transformers' own mask builders intersect with causal (and sliding-window) masking, so the result is a
  block-diagonal causal (sliding) mask in the backend's own format (4D bool, 4D float, BlockMask).
- flash_attention_2/3: transformers unpads with ``_get_unpad_data``; our replacement returns one
  sequence per document (`flash_unpad_data`).
- torch_varlen: torch's own ``torch.nn.attention.varlen.varlen_attn`` registered as a transformers
  attention backend (`register_varlen_attention`), so packed training needs no flash-attn install.

Unpadding data is cached per mask object (the same mask tensor reaches every layer), so the one host
sync happens once per forward, in mask creation, never per layer.
"""

from __future__ import annotations

import inspect
import math
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import torch

from ._contract import contract_error, import_module_checked, require_parameters
from ._patch import ItemPatch, PatchSet, mark
from ._probes import builder_what, call_builder
from .mask import UnpadData, document_ids_from_position_ids, get_unpad_data

__all__ = [
    "VARLEN_ATTN_IMPLEMENTATION",
    "document_mask_function",
    "flash_unpad_data",
    "register_varlen_attention",
    "unregister_varlen_attention",
    "varlen_attention_forward",
    "varlen_kernel",
]

VARLEN_ATTN_IMPLEMENTATION = "torch_varlen"


def document_mask_function(document_ids: torch.Tensor) -> Callable[..., Any]:
    """Mask function (transformers' index-based signature) allowing attention only within one document.

    Padding (id 0) forms its own trailing pseudo-document, so padded queries attend to padding only,
    never produce an all-masked row, and real tokens never see padding.
    """

    def same_document(batch_idx: Any, head_idx: Any, q_idx: Any, kv_idx: Any) -> Any:
        return document_ids[batch_idx, q_idx] == document_ids[batch_idx, kv_idx]

    return same_document


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
    attention_mask: torch.Tensor | None, kwargs: dict[str, Any], batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor, int]:
    """(gather indices or None, cu_seqlens, max_seqlen) for this batch; never syncs on the cached paths."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is not None:  # precomputed by the caller (e.g. PackingCollator(emit_cu_seqlens=True)): zero syncs
        max_q = kwargs.get("max_length_q")
        if max_q is None:
            raise ValueError("cu_seq_lens_q was passed without max_length_q; pass both")
        return None, cu.to(device=device, dtype=torch.int32), int(max_q)
    if attention_mask is not None:
        if attention_mask.ndim != 2:
            raise ValueError(
                f"torch_varlen expects a 2D (indexed or 0/1) attention mask, got shape {tuple(attention_mask.shape)}"
            )
        data = cached_unpad_data(attention_mask)
        return data.indices, data.cu_seqlens, data.max_seqlen
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
    indices, cu_seqlens, max_seqlen = _varlen_layout(attention_mask, kwargs, batch, seq, query.device)

    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.transpose(1, 2).reshape(batch * seq, t.shape[1], dim)
        return t if indices is None else t.index_select(0, indices)

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
    if indices is not None:
        out = out.new_zeros(batch * seq, heads, dim).index_copy(0, indices, out)
    return out.view(batch, seq, heads, dim), None


def varlen_mask(*args: Any, attention_mask: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor | None:
    """AttentionMaskInterface entry for torch_varlen: keep the 2D mask (unpadded inside attention)."""
    if attention_mask is not None and attention_mask.ndim == 2:
        kv_length = kwargs.get("kv_length")
        if isinstance(kv_length, int) and attention_mask.shape[-1] > kv_length:
            attention_mask = attention_mask[:, -kv_length:]
        cached_unpad_data(attention_mask)  # the one sync, here rather than in the first layer
    return attention_mask


mark(varlen_attention_forward, "am_packing.varlen_attention_forward")
mark(flash_unpad_data, "am_packing.flash_unpad_data")
mark(varlen_mask, "am_packing.varlen_mask")


# --------------------------------------------------------------------------- registration
class _VarlenPatchSet(PatchSet):
    def revert(self) -> None:
        global _VARLEN_SET
        super().revert()
        if _VARLEN_SET is self:
            _VARLEN_SET = None


_VARLEN_SET: PatchSet | None = None


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
    for builder in ("create_causal_mask", "create_sliding_window_causal_mask"):
        _probe_mask_interface_call(masking, builder, _unpatched_builder(masking, builder))


_MASK_KEYWORDS = ("attention_mask", "kv_length")
_PROBE_LENGTH = 4


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


def _unpatched_builder(masking: Any, builder: str) -> Any:
    live = getattr(masking, builder, None)
    if getattr(live, "__am_patch__", None) == f"am_packing.{builder}":  # configure_packing is active
        from . import patches  # runtime import: patches imports this module

        live = patches._ORIGINALS.get(builder, live)
    return live


def _record_mask_interface_calls(masking: Any, builder: str, original: Any) -> list[tuple[tuple, dict]]:
    """Every call `original` makes to the mask interface on a 0/1 probe mask (args, kwargs).

    The recorder is registered under a fresh key only this call names (so no model or other thread
    dispatches to it) and the registry is restored exactly, also when the probe fails.
    """
    calls: list[tuple[tuple, dict]] = []

    def record(*args: Any, **kwargs: Any) -> None:
        calls.append((args, kwargs))

    registry = masking.AttentionMaskInterface._global_mapping
    key = f"am_packing_probe_{uuid.uuid4().hex}"
    registry[key] = record
    try:
        mask = torch.ones(1, _PROBE_LENGTH, dtype=torch.long)
        call_builder(builder, original, key, _PROBE_LENGTH, attention_mask=mask)
    finally:
        del registry[key]
    return calls


def _probe_mask_interface_call(masking: Any, builder: str, original: Any) -> None:
    """The builder calls the mask interface with `attention_mask` (the 2D mask) and `kv_length` as keywords."""
    what = builder_what(builder)
    calls = _record_mask_interface_calls(masking, builder, original)
    if not calls:
        raise contract_error(what, "the probe call never reached the AttentionMaskInterface function")
    for args, kwargs in calls:
        missing = [n for n in _MASK_KEYWORDS if n not in kwargs]
        if missing:
            raise contract_error(
                what,
                f"no longer calls the AttentionMaskInterface function with keywords {list(_MASK_KEYWORDS)} "
                f"(missing {missing}; {len(args)} positional arguments)",
            )
        mask, kv_length = kwargs["attention_mask"], kwargs["kv_length"]
        if not (
            isinstance(mask, torch.Tensor) and mask.shape == (1, _PROBE_LENGTH) and kv_length == _PROBE_LENGTH
        ):
            raise contract_error(
                what,
                f"called the AttentionMaskInterface function with attention_mask={mask!r}, kv_length={kv_length!r}; "
                f"expected the 2D probe mask of shape (1, {_PROBE_LENGTH}) and kv_length={_PROBE_LENGTH}",
            )


def register_varlen_attention(name: str = VARLEN_ATTN_IMPLEMENTATION) -> PatchSet:
    """Register torch varlen attention as ``attn_implementation=name`` (attention + mask interfaces).

    Idempotent; returns the handle (``.revert()``, context manager). Undo: `unregister_varlen_attention`.
    Needs torch>=2.10 at call time of the attention, and a CUDA device for the kernel itself.
    """
    global _VARLEN_SET
    if _VARLEN_SET is not None and _VARLEN_SET.applied:
        return _VARLEN_SET
    import transformers

    masking = import_module_checked("transformers.masking_utils")
    patches = _VarlenPatchSet(
        [
            ItemPatch(
                transformers.AttentionInterface._global_mapping,
                name,
                varlen_attention_forward,
                contract=_check_registries,
                label="AttentionInterface",
            ),
            ItemPatch(
                masking.AttentionMaskInterface._global_mapping,
                name,
                varlen_mask,
                label="AttentionMaskInterface",
            ),
        ],
        name=f"am_packing.register_varlen_attention({name!r})",
    )
    patches.apply()
    _VARLEN_SET = patches
    return patches


def unregister_varlen_attention() -> None:
    """Remove the torch_varlen registration (no-op when not registered)."""
    global _VARLEN_SET
    if _VARLEN_SET is not None:
        _VARLEN_SET.revert()
        _VARLEN_SET = None
