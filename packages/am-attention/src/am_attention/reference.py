"""A DotProductAttention on torch SDPA with Transformer Engine's call convention.

Used on CPU, in tests, and whenever transformer-engine is not installed. Constructor and
forward take the names TE's `transformer_engine.pytorch.DotProductAttention` takes; outputs
have TE's shapes (heads flattened: [B, S, H*D] for bshd, [S, B, H*D] for sbhd, [T, H*D] for thd).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

__all__ = ["ReferenceDotProductAttention"]

_FORMATS = ("bshd", "sbhd", "thd")
_MASK_TYPES = ("causal", "no_mask", "padding_causal", "padding")
_SOFTMAX_TYPES = ("vanilla", "off-by-one", "learnable")


class ReferenceDotProductAttention(torch.nn.Module):
    """Exact attention (fp32-accurate on CPU) with TE's arguments; no state.

    Like TE, `softmax_type="learnable"` gives it a `softmax_offset` parameter (one sink logit per head, an
    extra softmax-denominator term exp(offset_h)), and "off-by-one" a zero offset.
    """

    def __init__(
        self,
        num_attention_heads: int,
        kv_channels: int,
        num_gqa_groups: int | None = None,
        attention_dropout: float = 0.0,
        qkv_format: str = "sbhd",
        attn_mask_type: str = "causal",
        window_size: tuple[int, int] | None = None,
        softmax_scale: float | None = None,
        softmax_type: str = "vanilla",
    ) -> None:
        super().__init__()
        num_attention_heads = _positive_int("num_attention_heads", num_attention_heads)
        kv_channels = _positive_int("kv_channels", kv_channels)
        if num_gqa_groups is not None:
            num_gqa_groups = _positive_int("num_gqa_groups", num_gqa_groups)
        if (
            isinstance(attention_dropout, bool)
            or not isinstance(attention_dropout, (int, float))
            or not 0.0 <= attention_dropout < 1.0
        ):
            raise ValueError(f"attention_dropout must be a float in [0, 1), got {attention_dropout!r}")
        if softmax_scale is not None and (
            isinstance(softmax_scale, bool)
            or not isinstance(softmax_scale, (int, float))
            or not math.isfinite(softmax_scale)
            or softmax_scale <= 0
        ):
            raise ValueError(f"softmax_scale must be a positive finite float, got {softmax_scale!r}")
        if window_size is not None:
            window_size = _window("window_size", window_size)
        _choice("qkv_format", qkv_format, _FORMATS)
        _choice("attn_mask_type", attn_mask_type, _MASK_TYPES)
        _choice("softmax_type", softmax_type, _SOFTMAX_TYPES)
        groups = num_attention_heads if num_gqa_groups is None else num_gqa_groups
        if num_attention_heads % groups:
            raise ValueError(
                f"num_attention_heads {num_attention_heads} not divisible by num_gqa_groups {groups}"
            )
        self.num_attention_heads = num_attention_heads
        self.kv_channels = kv_channels
        self.num_gqa_groups = groups
        self.attention_dropout = float(attention_dropout)
        self.qkv_format = qkv_format
        self.attn_mask_type = attn_mask_type
        self.window_size = (-1, 0) if window_size is None else tuple(window_size)
        self.softmax_scale = 1.0 / math.sqrt(kv_channels) if softmax_scale is None else float(softmax_scale)
        self.softmax_type = softmax_type
        self.softmax_offset: torch.Tensor | None
        if softmax_type == "learnable":
            self.softmax_offset = torch.nn.Parameter(torch.zeros(num_attention_heads))
        elif softmax_type == "off-by-one":
            self.register_buffer("softmax_offset", torch.zeros(num_attention_heads), persistent=False)
        else:
            self.softmax_offset = None

    def forward(
        self,
        query_layer: torch.Tensor,
        key_layer: torch.Tensor,
        value_layer: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        qkv_format: str | None = None,
        cu_seqlens_q: torch.Tensor | None = None,
        cu_seqlens_kv: torch.Tensor | None = None,
        max_seqlen_q: int | None = None,
        max_seqlen_kv: int | None = None,
        attn_mask_type: str | None = None,
        window_size: tuple[int, int] | None = None,
    ) -> torch.Tensor:
        fmt = qkv_format or self.qkv_format
        mask_type = attn_mask_type or self.attn_mask_type
        window = _window("window_size", window_size) if window_size is not None else self.window_size
        _choice("qkv_format", fmt, _FORMATS)
        _choice("attn_mask_type", mask_type, _MASK_TYPES)
        if attention_mask is not None:
            raise ValueError(
                "the reference kernel takes no attention_mask tensor; use attn_mask_type/cu_seqlens"
            )
        dropout = self.attention_dropout if self.training else 0.0
        if fmt == "thd":
            if cu_seqlens_q is None or cu_seqlens_kv is None:
                raise ValueError("qkv_format 'thd' needs cu_seqlens_q and cu_seqlens_kv")
            return self._thd(
                query_layer, key_layer, value_layer, cu_seqlens_q, cu_seqlens_kv, mask_type, window, dropout
            )
        if mask_type.startswith("padding"):
            raise ValueError(f"attn_mask_type {mask_type!r} needs qkv_format 'thd' in the reference kernel")
        if fmt == "sbhd":
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query_layer, key_layer, value_layer))
        else:
            q, k, v = (t.transpose(1, 2) for t in (query_layer, key_layer, value_layer))
        causal = mask_type == "causal"
        sq, sk = q.shape[-2], k.shape[-2]
        mask = None
        if causal and (window[0] >= 0 or sq != sk or self.softmax_offset is not None):
            mask = _band(sq, sk, window, q.device)
        if self.softmax_offset is not None:
            out = attention_with_sinks(q, k, v, mask, self.softmax_offset, self.softmax_scale, dropout)
        else:
            out = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                dropout_p=dropout,
                is_causal=causal and mask is None,
                scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )
        if fmt == "sbhd":
            return out.permute(2, 0, 1, 3).flatten(2)
        return out.transpose(1, 2).flatten(2)

    def _thd(self, q, k, v, cu_q, cu_kv, mask_type, window, dropout) -> torch.Tensor:
        t = q.shape[0]
        _check_cu("cu_seqlens_q", cu_q, t)
        _check_cu("cu_seqlens_kv", cu_kv, k.shape[0])
        pos = torch.arange(t, device=q.device)
        doc_q = torch.searchsorted(cu_q[1:].to(torch.long), pos, right=True)
        doc_k = torch.searchsorted(
            cu_kv[1:].to(torch.long), torch.arange(k.shape[0], device=q.device), right=True
        )
        valid_q = pos < cu_q[-1]
        mask = doc_q[:, None] == doc_k[None, :]
        if mask_type.endswith("causal"):
            # within a document, queries and keys share offsets for self-attention (cu_q == cu_kv)
            mask = mask & _band(t, k.shape[0], window, q.device)
        # rows past the last document (THD padding) attend to themselves and are zeroed below
        mask = mask | (
            ~valid_q[:, None] & (pos[:, None] == torch.arange(k.shape[0], device=q.device)[None, :])
        )
        qh, kh, vh = (t.transpose(0, 1)[None] for t in (q, k, v))
        if self.softmax_offset is not None:
            out = attention_with_sinks(qh, kh, vh, mask, self.softmax_offset, self.softmax_scale, dropout)
        else:
            out = F.scaled_dot_product_attention(
                qh, kh, vh, attn_mask=mask, dropout_p=dropout, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1],
            )  # fmt: skip
        out = out[0].transpose(0, 1)
        out = torch.where(valid_q[:, None, None], out, torch.zeros_like(out))
        return out.flatten(1)


def attention_with_sinks(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor | None,
    sinks: torch.Tensor,
    scale: float,
    dropout: float = 0.0,
) -> torch.Tensor:
    """SDPA on [B, H, S, D] inputs with one sink logit per query head added to the softmax denominator.

    The sink is a key of zeros (logit 0) whose additive mask entry is the sink, with a value of zeros, so it
    takes probability mass without contributing to the output: exactly softmax over [logits, sink] with the
    sink column dropped, as HF's eager sink attention computes it. `mask`: bool (True = attend), additive
    float, or None; broadcastable to [B, H, Sq, Sk]. K/V may have fewer (grouped) heads.
    """
    batch, heads, sq, dim = query.shape
    if key.shape[1] != heads:
        key = key.repeat_interleave(heads // key.shape[1], dim=1)
        value = value.repeat_interleave(heads // value.shape[1], dim=1)
    sk = key.shape[2]
    dtype = query.dtype
    if mask is None:
        additive = query.new_zeros(1, 1, sq, sk)
    elif mask.dtype == torch.bool:
        additive = torch.zeros(mask.shape, dtype=dtype, device=query.device).masked_fill(~mask, float("-inf"))
    else:
        additive = mask.to(dtype)
    additive = additive.expand(batch, heads, sq, sk)
    sink = sinks.to(device=query.device, dtype=dtype).view(1, heads, 1, 1).expand(batch, heads, sq, 1)
    key = torch.cat([key, key.new_zeros(batch, heads, 1, dim)], dim=2)
    value = torch.cat([value, value.new_zeros(batch, heads, 1, value.shape[-1])], dim=2)
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask=torch.cat([additive, sink], dim=-1), dropout_p=dropout, scale=scale
    )


def _band(sq: int, sk: int, window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """Bool [sq, sk] mask, True = attend: causal aligned bottom-right, limited to `window` = (left, right)."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=device)[None, :]
    mask = j <= i + max(window[1], 0)
    if window[0] >= 0:
        mask = mask & (j >= i - window[0])
    return mask


def _choice(name: str, value: object, allowed: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _window(name: str, value: object) -> tuple[int, int]:
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in value)
    ):
        raise ValueError(f"{name} must be a pair of ints >= -1, got {value!r}")
    return int(value[0]), int(value[1])


def _check_cu(name: str, cu: object, tokens: int) -> None:
    """1D integer, starts at 0, never decreases, ends within the `tokens` given (the reference reads it: one sync)."""
    if not isinstance(cu, torch.Tensor) or cu.ndim != 1 or cu.numel() < 2 or cu.is_floating_point():
        raise ValueError(f"{name} must be a 1D integer tensor of at least 2 offsets, got {cu!r}")
    values = cu.tolist()
    if values[0] != 0 or any(b < a for a, b in itertools.pairwise(values)) or values[-1] > tokens:
        raise ValueError(f"{name} must rise from 0 to at most the {tokens} tokens given, got {values}")
