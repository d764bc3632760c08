"""Model construction shared by the checks: meta models for structure, small real ones for numbers."""

from __future__ import annotations

from typing import Any

import torch

from ..tiny_models import build_model


def meta_model(config: Any) -> torch.nn.Module:
    """The full-size model on the meta device: structure only, no memory, no weights."""
    with torch.device("meta"):
        return build_model(config, attn_implementation="sdpa")


def real_model(config: Any, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    return build_model(config, attn_implementation=attn_implementation, seed=seed)


def text_vocab(config: Any) -> int:
    return int((getattr(config, "text_config", None) or config).vocab_size)
