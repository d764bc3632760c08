"""One "te" attention call: the kernel in BSHD or THD, or transformers' SDPA with the exact same attention.

The call first works out which attention the batch asks for (`_Layout`), then whether the kernel can compute
it. The pattern is the same whichever path runs, so a fallback never changes the numbers:

- "causal" / "no_mask": no mask (or a canonical causal / causal+sliding 4D mask) and one document per row;
- "docs": a packed batch — per-document `position_ids`, an indexed `[B, S]` mask (document ids, 0 = padding)
  or `cu_seq_lens_q/k` kwargs — with no mask or a canonical one: causal (+window) attention inside each
  document. The kernel runs in THD; a fallback gives SDPA the block-diagonal mask built from the documents;
- "mask": any other 4D mask (padding, custom patterns): SDPA with that mask, as transformers would.

Classifying a mask and finding document boundaries read tensor values; both are memoised per tensor object
(`te_masks`), so a forward pays one host synchronisation for them, not one per layer.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from . import stats
from .reference import _band, attention_with_sinks
from .te_masks import (
    PackedInfo,
    classify_mask_cached,
    cu_info_cached,
    document_mask,
    document_segments,
    packed_info_cached,
    packed_mask_matches,
)
from .te_params import window_of

KERNEL_ATTR = "attn_module"  # the seed's name: tools detect TE attention by this attribute
PARAMS_ATTR = "_am_te_params"


# Tensor keywords the "te" backend reads (boundaries, positions) or takes (sinks); any other tensor a forward
# hands its attention function (a relative position bias, ...) changes the attention in a way the kernel
# cannot reproduce.
KNOWN_TENSOR_KWARGS = frozenset({"position_ids", "cache_position", "cu_seq_lens_q", "cu_seq_lens_k", "s_aux"})


def unknown_tensor_kwargs(kwargs: dict[str, Any]) -> list[str]:
    """Names of the tensor keywords of an attention call that the kernel path does not know."""
    return sorted(
        k for k, v in kwargs.items() if isinstance(v, torch.Tensor) and k not in KNOWN_TENSOR_KWARGS
    )


class _Layout(NamedTuple):
    pattern: str  # "causal", "no_mask", "docs" or "mask"
    source: tuple[str, torch.Tensor] | None = None  # the documents' source for "docs"
    info: PackedInfo | None = None


def _left_window(module: torch.nn.Module, params: Any, kwargs: dict[str, Any]) -> int:
    """TE's left window (-1 = none) the call asks for: the runtime `sliding_window`, else the layer's."""
    runtime = kwargs.get("sliding_window")
    if isinstance(runtime, int) and not isinstance(runtime, bool) and runtime > 0:
        return runtime - 1
    if params is not None:
        return params.window_size[0]
    window = window_of(module)
    return window[0] if window is not None else -1


def _documents(
    query: torch.Tensor, key: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]
) -> tuple[tuple[str, torch.Tensor] | None, PackedInfo | None]:
    """The packed-batch source and its THD boundaries, or (None, None) when each row is one document."""
    batch, _, seq, _ = query.shape
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if attention_mask.is_floating_point() or attention_mask.is_complex():
            raise ValueError(
                "a 2D attention_mask reaching the 'te' backend must be an indexed packing mask (integer "
                f"document ids, 0 = padding), got dtype {attention_mask.dtype}"
            )
        if key.shape[2] != seq or tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"indexed attention_mask of shape {tuple(attention_mask.shape)} does not match the batch "
                f"({batch}, {seq}) of a self-attention call without cache"
            )
        mask = attention_mask.to(torch.int32) if attention_mask.dtype == torch.bool else attention_mask
        return ("indexed", mask), packed_info_cached(mask, "indexed", batch)
    if key.shape[2] != seq:
        return None, None
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if cu_q is not cu_k and not torch.equal(cu_q, cu_k):
            return None, None  # not self-attention boundaries: the mask, if any, decides
        return ("cu", cu_q), cu_info_cached(cu_q, batch * seq, kwargs.get("max_length_q"))
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and position_ids.shape[-1] == seq:
        info = packed_info_cached(position_ids, "position_ids", batch)
        if info is not None:
            return ("position_ids", position_ids.expand(batch, -1)), info
    return None, None


def _layout(query, key, attention_mask, kwargs, causal: bool, left: int) -> _Layout:
    source, info = _documents(query, key, attention_mask, kwargs)
    mask = attention_mask
    if source is not None and source[0] == "indexed":
        return _Layout("docs", source, info)
    if mask is None:
        if source is not None:
            return _Layout("docs", source, info)
        return _Layout("causal" if causal and query.shape[2] > 1 else "no_mask")
    # a 4D mask decides the pattern whatever `is_causal` says (an eager-built decoder may flag its causal
    # self-attention non-causal and rely on the mask alone)
    if not isinstance(mask, torch.Tensor) or mask.ndim != 4 or key.shape[2] != query.shape[2]:
        return _Layout("mask")
    canonical = classify_mask_cached(mask, (left, 0))
    if source is None:
        return _Layout("causal" if canonical else "mask")
    # the documents' block-causal mask (transformers' packed detection) or a plain causal one (it skips the
    # detection when a cache is passed): either way the documents are kept apart, as without a mask
    if canonical or packed_mask_matches(mask, source[0], source[1], left):
        return _Layout("docs", source, info)
    return _Layout("mask")


def _blocker(kernel, params, query, key, dropout, scaling, kwargs) -> str:
    """The stats key of why the kernel cannot run this call, or ""."""
    if kernel is None or params is None:
        return "fallback_not_injected"
    if dropout != 0.0:
        return "fallback_dropout"  # the kernel is built without dropout (see te_inject)
    if scaling is not None and abs(float(scaling) - params.softmax_scale) > 1e-6 * params.softmax_scale:
        return "fallback_scale_mismatch"  # TE fixes softmax_scale at construction
    runtime_window = kwargs.get("sliding_window")
    if runtime_window is not None and params.window_size[0] != runtime_window - 1:
        return "fallback_window_mismatch"
    if unknown_tensor_kwargs(kwargs):
        return "fallback_inputs"  # e.g. a relative position bias added to the logits
    s_aux = kwargs.get("s_aux")
    if (s_aux is None) != (params.sinks is None):
        return "fallback_sinks"
    if s_aux is not None and getattr(kernel, "softmax_offset", None) is not s_aux:
        return "fallback_sinks"  # the module's sinks were replaced after injection
    _, heads, seq, _ = query.shape
    kv_heads = key.shape[1]
    if key.shape[2] != seq or heads != params.num_heads:
        return "fallback_shape"  # decoding with a cache, or a module reshaped after injection
    if kv_heads != params.num_kv_heads and kv_heads != heads:
        return "fallback_shape"
    return ""


def dispatch(
    sdpa: Any,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Any,
    dropout: float,
    scaling: float | None,
    is_causal: bool | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """Run one call of the "te" attention function; `sdpa` is transformers' SDPA attention function."""
    kernel, params = vars(module).get(KERNEL_ATTR), vars(module).get(PARAMS_ATTR)
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", True))
    left = _left_window(module, params, kwargs)
    layout = _layout(query, key, attention_mask, kwargs, causal, left)
    if (
        layout.pattern in ("causal", "docs")
        and isinstance(attention_mask, torch.Tensor)
        and attention_mask.ndim == 4
    ):
        causal = True  # the mask was matched against the causal (block-causal) pattern
    reason = _blocker(kernel, params, query, key, dropout, scaling, kwargs)
    if not reason and layout.pattern == "mask":
        reason = "fallback_mask"
    if not reason:
        if key.shape[1] != params.num_kv_heads:
            # repeat_kv already expanded the kv heads; TE groups them natively, so take one copy per group
            n_rep = query.shape[1] // params.num_kv_heads
            key, value = key[:, ::n_rep], value[:, ::n_rep]
        if layout.pattern == "docs":
            return _run_thd(kernel, params, query, key, value, layout.info, causal), None
        return _run_bshd(kernel, params, query, key, value, layout.pattern), None
    stats.count(reason)
    if kwargs.get("s_aux") is not None:  # transformers' SDPA has no sinks: computed here, exactly
        return _sinks_fallback(
            query, key, value, attention_mask, layout, causal, left, dropout, scaling, kwargs
        )
    if layout.pattern != "docs":
        return sdpa(
            module,
            query,
            key,
            value,
            attention_mask,
            dropout=dropout,
            scaling=scaling,
            is_causal=is_causal,
            **kwargs,
        )
    # transformers' SDPA computing the kernel's THD attention: the documents' block-diagonal mask
    batch, _, seq, _ = query.shape
    kind, source = layout.source
    seg, valid = document_segments(kind, source, batch, seq)
    mask = document_mask(seg, valid, causal, left)
    out, weights = sdpa(
        module, query, key, value, mask, dropout=dropout, scaling=scaling, is_causal=False, **kwargs
    )
    if kind != "position_ids":  # padding tokens come out as zeros, as from the THD kernel
        out = out * valid[:, :, None, None].to(out.dtype)
    return out, weights


def _sinks_fallback(query, key, value, attention_mask, layout, causal, left, dropout, scaling, kwargs):
    """Attention with learnable sinks (`s_aux`, one logit per head) over the pattern the call asks for."""
    batch, _, seq, head_dim = query.shape
    scale = head_dim**-0.5 if scaling is None else float(scaling)
    valid = None
    if layout.pattern == "docs":
        kind, source = layout.source
        seg, valid = document_segments(kind, source, batch, seq)
        mask = document_mask(seg, valid, causal, left)
    elif layout.pattern == "mask":
        mask = attention_mask[..., : key.shape[2]] if isinstance(attention_mask, torch.Tensor) else None
    elif layout.pattern == "causal":
        mask = _band(seq, key.shape[2], (left, 0), query.device)
    else:
        mask = None
    out = attention_with_sinks(query, key, value, mask, kwargs["s_aux"], scale, dropout).transpose(1, 2)
    if valid is not None and layout.source[0] != "position_ids":
        out = out * valid[:, :, None, None].to(out.dtype)
    return out.contiguous(), None


def _run_bshd(kernel, params, query, key, value, mask_type: str) -> torch.Tensor:
    stats.count("te_hits")
    batch, heads, seq, head_dim = query.shape
    # TE's fused kernels read q/k/v through their bshd strides as if contiguous: hand them dense tensors
    # (transformers' [B, H, S, D] transposed views and repeat_kv's strided undo are not).
    out = kernel(
        query.transpose(1, 2).contiguous(),
        key.transpose(1, 2).contiguous(),
        value.transpose(1, 2).contiguous(),
        qkv_format="bshd",
        attn_mask_type=mask_type,
        window_size=params.window_size if mask_type == "causal" else (-1, -1),
    )
    return out.view(batch, seq, heads, head_dim)


def _run_thd(kernel, params, query, key, value, packed: PackedInfo, causal: bool) -> torch.Tensor:
    stats.count("te_hits")
    stats.count("te_thd_hits")
    batch, heads, seq, head_dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * seq, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * seq, kv_heads, head_dim)
    v = value.transpose(1, 2).reshape(batch * seq, kv_heads, value.shape[-1])
    if packed.indices is not None:
        q, k, v = (t.index_select(0, packed.indices) for t in (q, k, v))
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = kernel(
        q,
        k,
        v,
        qkv_format="thd",
        cu_seqlens_q=packed.cu_seqlens,
        cu_seqlens_kv=packed.cu_seqlens,
        max_seqlen_q=packed.max_seqlen,
        max_seqlen_kv=packed.max_seqlen,
        attn_mask_type="padding_causal" if causal else "padding",
        window_size=params.window_size if causal else (-1, -1),
    ).view(-1, heads, head_dim)
    if packed.indices is not None:
        out = out.new_zeros(batch * seq, heads, head_dim).index_copy(0, packed.indices, out)
    return out.view(batch, seq, heads, head_dim)
