"""Tiny CPU probe calls of transformers' mask builders (am-packing only, not a shared copy).

Contract checks call the unpatched builders on a few tokens and look at what they do, so a changed
private contract is caught by behaviour, not by version numbers or by reading their code.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

from ._contract import contract_error, parameter_name

# Window of the probe config; shorter than the probe documents, so the sliding builder's window shows.
PROBE_WINDOW = 3


def builder_what(builder: str) -> str:
    return f"transformers.masking_utils.{builder}"


def call_builder(builder: str, original: Any, attn_implementation: str, seq: int, **kwargs: Any) -> Any:
    """``original(config=..., inputs_embeds=[1, seq, 1], <cache>=None, **kwargs)`` on CPU.

    The cache is passed under the spelling `original` declares (``past_key_values``, ``cache`` since
    5.24), never a deprecated one. Any failure is a contract error: the call convention changed.
    """
    import transformers

    what = builder_what(builder)
    cache = parameter_name(original, "past_key_values", what)
    config = transformers.PretrainedConfig()  # config-less: the builders read only these two fields
    config._attn_implementation = attn_implementation
    config.sliding_window = PROBE_WINDOW
    call: dict[str, Any] = dict(
        config=config, inputs_embeds=torch.zeros(1, seq, 1), **{cache: None}, **kwargs
    )
    if "cache_position" in inspect.signature(original).parameters:  # required on transformers 5.3
        call["cache_position"] = torch.arange(seq)
    try:
        return original(**call)
    except Exception as exc:
        raise contract_error(what, f"the probe call failed ({exc!r})") from exc
