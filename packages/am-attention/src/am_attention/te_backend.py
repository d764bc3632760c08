"""The "te" attention backend: a transformers attention function that runs a DotProductAttention per module.

Registered under `attn_implementation="te"` in transformers' `AttentionInterface` (and the
matching mask function in `AttentionMaskInterface`, which builds SDPA-style masks). Both are
registry entries applied through `ItemPatch`, so registering is explicit and undone exactly.
Nothing process-global is swapped: models whose config names another backend never reach this
code, and modules without an injected kernel run transformers' own SDPA function.

Per call the dispatcher reads only Python attributes and tensor shapes. Mask classification and
packed-document boundaries need the mask's values; they are computed once per mask object (one
host synchronisation per forward, memoised for the other layers) and skipped while tracing with
torch.compile, where a 4D mask falls back to SDPA and a `None` mask runs the kernel directly —
so the kernel path has no graph break.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from . import stats
from ._contract import contract_error, import_module_checked, require_parameters
from ._patch import ItemPatch, PatchSet, mark
from .te_masks import PackedInfo, classify_mask_cached, packed_info_cached, packed_mask_matches

__all__ = [
    "TE_ATTN_IMPLEMENTATION",
    "is_te_attention_backend_registered",
    "register_te_attention_backend",
    "te_attention_forward",
    "unregister_te_attention_backend",
]

TE_ATTN_IMPLEMENTATION = "te"
KERNEL_ATTR = "attn_module"  # the seed's name: tools detect TE attention by this attribute
PARAMS_ATTR = "_am_te_params"

# Set when the backend is registered: the SDPA attention and mask functions we delegate to.
_DELEGATES: dict[str, Any] = {}
_registration: PatchSet | None = None


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _fallback(module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs):
    sdpa = _DELEGATES.get("attention")
    if sdpa is None:
        raise RuntimeError("the 'te' attention backend was called without being registered")
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


def _packed(
    query: torch.Tensor, attention_mask: Any, kwargs: dict[str, Any]
) -> tuple[PackedInfo | None, str]:
    """Packed-batch boundaries, or (None, reason) — reason "" means not packed."""
    batch, _, seq, _ = query.shape
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is not None and cu_k is not None:
        if batch != 1 or (cu_q is not cu_k and not torch.equal(cu_q, cu_k)):
            return None, "fallback_shape"
        max_len = kwargs.get("max_length_q")
        if max_len is None:
            max_len = int((cu_q[1:] - cu_q[:-1]).max().item())
        return PackedInfo(cu_q.to(torch.int32), None, int(max_len), seq), ""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 2:
        if attention_mask.dtype == torch.bool or attention_mask.is_floating_point() or _compiling():
            return None, "fallback_mask"
        return packed_info_cached(attention_mask, "indexed", batch), ""
    position_ids = kwargs.get("position_ids")
    if isinstance(position_ids, torch.Tensor) and position_ids.ndim == 2 and not _compiling():
        info = packed_info_cached(position_ids, "position_ids", batch)
        if info is not None:
            return info, ""
    return None, ""


def te_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: [B, H, S, D] inputs, [B, S, H, D] output, like SDPA's."""
    args = (module, query, key, value, attention_mask, dropout, scaling, is_causal, kwargs)
    kernel = vars(module).get(KERNEL_ATTR)
    params = vars(module).get(PARAMS_ATTR)
    if kernel is None or params is None:
        stats.count("fallback_not_injected")
        return _fallback(*args)
    if dropout != 0.0:
        stats.count("fallback_dropout")  # the kernel is built without dropout (see te_inject)
        return _fallback(*args)
    if scaling is not None and abs(float(scaling) - params.softmax_scale) > 1e-6 * params.softmax_scale:
        stats.count("fallback_scale_mismatch")  # TE fixes softmax_scale at construction
        return _fallback(*args)
    runtime_window = kwargs.get("sliding_window")
    if runtime_window is not None and params.window_size[0] != runtime_window - 1:
        stats.count("fallback_window_mismatch")
        return _fallback(*args)
    batch, heads, seq, head_dim = query.shape
    if key.shape[2] != seq or heads != params.num_heads:
        stats.count("fallback_shape")  # decoding with a cache, or a module reshaped after injection
        return _fallback(*args)
    if key.shape[1] != params.num_kv_heads:
        if key.shape[1] != heads:
            stats.count("fallback_shape")
            return _fallback(*args)
        # repeat_kv already expanded the kv heads; TE groups them natively, so take one copy per group
        n_rep = heads // params.num_kv_heads
        key, value = key[:, ::n_rep], value[:, ::n_rep]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    packed, reason = _packed(query, attention_mask, kwargs)
    if reason:
        stats.count(reason)
        return _fallback(*args)
    if packed is not None and isinstance(attention_mask, torch.Tensor) and attention_mask.ndim == 4:
        position_ids = kwargs.get("position_ids")
        if position_ids is None or not packed_mask_matches(
            attention_mask, position_ids.expand(batch, -1), params.window_size[0]
        ):
            stats.count("fallback_mask")
            return _fallback(*args)
    if packed is not None:
        return _run_thd(kernel, params, query, key, value, packed, causal), None
    if attention_mask is None:
        mask_type = "causal" if causal and seq > 1 else "no_mask"
    elif (
        attention_mask.ndim == 4
        and not _compiling()
        and classify_mask_cached(attention_mask, params.window_size)
    ):
        mask_type = "causal"
    else:
        stats.count("fallback_mask")
        return _fallback(*args)
    stats.count("te_hits")
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
    return out.view(batch, seq, heads, head_dim), None


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


def te_mask(*args: Any, **kwargs: Any) -> Any:
    """Mask function for "te": SDPA's (bool masks, or None when transformers can skip the causal mask)."""
    return _DELEGATES["mask"](*args, **kwargs)


mark(te_attention_forward, "am_attention.te_attention_forward")
mark(te_mask, "am_attention.te_mask")


def _interfaces() -> tuple[type, type]:
    mu = import_module_checked("transformers.modeling_utils")
    mk = import_module_checked("transformers.masking_utils")
    attn_iface = getattr(mu, "AttentionInterface", None)
    mask_iface = getattr(mk, "AttentionMaskInterface", None)
    for name, iface in (("AttentionInterface", attn_iface), ("AttentionMaskInterface", mask_iface)):
        mapping = getattr(iface, "_global_mapping", None)
        if not isinstance(mapping, dict) or "sdpa" not in mapping:
            raise contract_error(
                f"transformers {name}._global_mapping", "expected a dict with an 'sdpa' entry"
            )
    return attn_iface, mask_iface


# te_mask forwards transformers' keyword call unchanged; these must be real parameters of the sdpa mask
# function (its **kwargs would swallow them silently), so the mask it builds honours the mask function,
# the padding mask and the causal-skip request the "te" dispatcher classifies.
_MASK_PARAMETERS = ("batch_size", "kv_length", "mask_function", "attention_mask", "allow_is_causal_skip")


def _check_mask_delegate(sdpa_mask: Any) -> None:
    what = "transformers.masking_utils.AttentionMaskInterface['sdpa']"
    sig = require_parameters(sdpa_mask, (), what)
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    missing = [
        n for n in _MASK_PARAMETERS if n not in sig.parameters or sig.parameters[n].kind not in keyword_kinds
    ]
    if missing:
        raise contract_error(what, f"expected keyword parameters {missing} in signature {sig}")


def register_te_attention_backend() -> PatchSet:
    """Register `attn_implementation="te"` (attention + mask functions); idempotent; undo with `unregister_...`."""
    global _registration
    if _registration is not None and _registration.applied:
        return _registration
    attn_iface, mask_iface = _interfaces()
    sdpa = attn_iface._global_mapping["sdpa"]
    sdpa_mask = mask_iface._global_mapping["sdpa"]

    def check_attention(_live: Any) -> None:
        require_parameters(
            sdpa, ["module", "query", "key", "value", "attention_mask", "scaling", "is_causal"]
        )

    # Both delegates are checked before the first registry write.
    check_attention(None)
    _check_mask_delegate(sdpa_mask)

    patches = PatchSet(
        [
            ItemPatch(
                attn_iface._global_mapping,
                TE_ATTN_IMPLEMENTATION,
                te_attention_forward,
                contract=check_attention,
                label="AttentionInterface._global_mapping",
            ),
            ItemPatch(
                mask_iface._global_mapping,
                TE_ATTN_IMPLEMENTATION,
                te_mask,
                label="AttentionMaskInterface._global_mapping",
            ),
        ],
        name="te_attention_backend",
    )
    _DELEGATES.update(attention=sdpa, mask=sdpa_mask)
    try:
        patches.apply()
    except BaseException:
        _DELEGATES.clear()
        raise
    _registration = patches
    return patches


def unregister_te_attention_backend() -> None:
    """Remove the "te" registry entries; a no-op when not registered."""
    global _registration
    if _registration is None:
        return
    _registration.revert()
    _registration = None
    _DELEGATES.clear()


def is_te_attention_backend_registered() -> bool:
    return _registration is not None and _registration.applied
