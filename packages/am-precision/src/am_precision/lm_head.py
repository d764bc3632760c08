"""Project final hidden states through the LM head and wrap them in `CausalLMOutputWithPast`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ._args import check_bool, check_tensor


def compute_lm_head_logits(
    lm_head: nn.Module | None,
    hidden_states: torch.Tensor,
    logits_to_keep: int | torch.Tensor = 0,
    is_thd: bool = False,
    fp32_lm_head: bool = False,
    output_hidden_states: bool = False,
) -> Any:
    """Logits for `hidden_states` ([T, H] packed/THD or [B, S, H]) as a `CausalLMOutputWithPast`.

    - `lm_head is None` (a pipeline stage without the head): hidden states pass through as `logits`.
    - `logits_to_keep == 0`: every position is projected, without slicing (a full slice is unsupported on
      DTensors under sequence parallelism). A positive int keeps the last N positions; a tensor keeps
      those position indices.
    - `is_thd`: 2D results (logits and attached hidden states) get a leading batch dim of 1.
    - `fp32_lm_head`: project in fp32 through `lm_head` itself (DTensor-aware) and cast back.
    - `output_hidden_states`: attach the full (THD-restored) hidden states; otherwise the field is None.
    """
    from transformers.modeling_outputs import CausalLMOutputWithPast

    if lm_head is not None and not callable(lm_head):
        raise TypeError(f"lm_head must be None or a module (callable), got {type(lm_head).__name__}")
    check_tensor(hidden_states, "hidden_states")
    for name, flag in (
        ("is_thd", is_thd),
        ("fp32_lm_head", fp32_lm_head),
        ("output_hidden_states", output_hidden_states),
    ):
        check_bool(flag, name)
    if isinstance(logits_to_keep, torch.Tensor) and (
        logits_to_keep.dim() != 1 or logits_to_keep.is_floating_point() or logits_to_keep.is_complex()
    ):
        raise TypeError(
            f"logits_to_keep as a tensor must be 1D integer position indices, got dtype {logits_to_keep.dtype} "
            f"and shape {tuple(logits_to_keep.shape)}"
        )
    if hidden_states.dim() not in (2, 3):
        raise ValueError(f"hidden_states must be [T, H] or [B, S, H], got shape {tuple(hidden_states.shape)}")
    if isinstance(logits_to_keep, bool) or not isinstance(logits_to_keep, (int, torch.Tensor)):
        raise TypeError(f"logits_to_keep must be an int or a tensor of indices, got {logits_to_keep!r}")
    if isinstance(logits_to_keep, int) and logits_to_keep < 0:
        raise ValueError(f"logits_to_keep must be >= 0 (0 keeps every position), got {logits_to_keep}")
    if lm_head is None:
        logits = hidden_states
    else:
        if isinstance(logits_to_keep, int) and logits_to_keep == 0:
            selected = hidden_states
        else:
            index = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            selected = hidden_states[index] if hidden_states.dim() == 2 else hidden_states[:, index]
        if fp32_lm_head:
            logits = lm_head(selected.float()).to(hidden_states.dtype)
        else:
            logits = lm_head(selected)
    if is_thd and logits.dim() == 2:
        logits = logits.unsqueeze(0)
    hidden_out = None
    if output_hidden_states:
        hidden_out = hidden_states.unsqueeze(0) if is_thd and hidden_states.dim() == 2 else hidden_states
    return CausalLMOutputWithPast(logits=logits, hidden_states=hidden_out)


__all__ = ["compute_lm_head_logits"]
