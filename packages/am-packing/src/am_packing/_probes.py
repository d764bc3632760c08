"""Tiny CPU probe calls of transformers' mask builders (am-packing only, not a shared copy).

Contract checks call the unpatched builders on a few tokens and look at what they do, so a changed
private contract is caught by behaviour, not by version numbers or by reading their code.
"""

from __future__ import annotations

import inspect
import uuid
from typing import Any

import torch

from ._contract import contract_error, parameter_name

# Window of the probe config; shorter than the probe documents, so the sliding builder's window shows.
PROBE_WINDOW = 3
# Tokens of the 0/1 probe mask handed to a builder when recording its calls of the mask interface.
PROBE_LENGTH = 4


def builder_what(builder: str) -> str:
    return f"transformers.masking_utils.{builder}"


def call_builder(builder: str, original: Any, attn_implementation: str, seq: int, **kwargs: Any) -> Any:
    """``original(config=..., inputs_embeds=[batch, seq, 1], <cache>=None, **kwargs)`` on CPU.

    The cache is passed under the spelling `original` declares (``past_key_values``, ``cache`` since
    5.24), never a deprecated one. Any failure is a contract error: the call convention changed.
    """
    import transformers

    what = builder_what(builder)
    cache = parameter_name(original, "past_key_values", what)
    config = transformers.PretrainedConfig()  # config-less: the builders read only these two fields
    config._attn_implementation = attn_implementation
    config.sliding_window = PROBE_WINDOW
    mask = kwargs.get("attention_mask")
    batch = mask.shape[0] if isinstance(mask, torch.Tensor) else 1
    call: dict[str, Any] = dict(
        config=config, inputs_embeds=torch.zeros(batch, seq, 1), **{cache: None}, **kwargs
    )
    if "cache_position" in inspect.signature(original).parameters:  # required on transformers 5.3
        call["cache_position"] = torch.arange(seq)
    try:
        return original(**call)
    except Exception as exc:
        raise contract_error(what, f"the probe call failed ({exc!r})") from exc


def record_mask_interface_calls(
    masking: Any, builder: str, original: Any, entry: Any = None, *, seq: int = PROBE_LENGTH, **kwargs: Any
) -> tuple[list[tuple[tuple, dict]], Any]:
    """``(calls, result)``: every call `original` makes to the mask interface ((args, kwargs) each) and the
    builder's result, on a 0/1 probe mask unless `kwargs` give another ``attention_mask``.

    `entry`, if given, is called for each of them (its result returned to the builder). It is registered under a fresh
    key only this call names (so no model or other thread dispatches to it), and the registry is restored
    exactly, also when the probe fails.
    """
    calls: list[tuple[tuple, dict]] = []

    def record(*a: Any, **k: Any) -> Any:
        calls.append((a, k))
        return entry(*a, **k) if entry is not None else None

    registry = masking.AttentionMaskInterface._global_mapping
    key = f"am_packing_probe_{uuid.uuid4().hex}"
    registry[key] = record
    try:
        kwargs.setdefault("attention_mask", torch.ones(1, seq, dtype=torch.long))
        result = call_builder(builder, original, key, seq, **kwargs)
    finally:
        del registry[key]
    return calls, result


def probe_mask_interface_call(masking: Any, builder: str, original: Any, keywords: tuple[str, ...]) -> None:
    """The builder calls the mask interface with `keywords` (among them the 2D mask and kv_length) by name."""
    what = builder_what(builder)
    calls, _ = record_mask_interface_calls(masking, builder, original)
    if not calls:
        raise contract_error(what, "the probe call never reached the AttentionMaskInterface function")
    for args, kwargs in calls:
        missing = [n for n in keywords if n not in kwargs]
        if missing:
            raise contract_error(
                what,
                f"no longer calls the AttentionMaskInterface function with keywords {list(keywords)} "
                f"(missing {missing}; {len(args)} positional arguments)",
            )
        mask, kv_length = kwargs.get("attention_mask"), kwargs.get("kv_length")
        if not (
            isinstance(mask, torch.Tensor) and mask.shape == (1, PROBE_LENGTH) and kv_length == PROBE_LENGTH
        ):
            raise contract_error(
                what,
                f"called the AttentionMaskInterface function with attention_mask={mask!r}, kv_length={kv_length!r}; "
                f"expected the 2D probe mask of shape (1, {PROBE_LENGTH}) and kv_length={PROBE_LENGTH}",
            )
