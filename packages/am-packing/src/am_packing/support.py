"""`check_packing_support(model)`: whether a packed row gives each document exactly what it gets alone.

Decided from what the model contains, before anything changes. A document mask can only separate the
documents inside attention that goes through transformers' mask builders; everything else that mixes
positions must be absent, or refused here with its cause:

- layers that carry state across positions: ``layer_types`` entries that are not (full / sliding)
  attention (linear attention, mamba, conv, compressed attention, ...), and ``nn.Conv1d`` modules in the
  text model (the short convolutions of SSM / linear-attention / conv mixers, which read neighbouring tokens);
- chunked attention (``attention_chunk_size``): the chunks follow absolute positions in the row, not in
  each document;
- attention masks built by the modeling code itself: no modeling module of the text model uses
  transformers' ``create_causal_mask`` / ``create_sliding_window_causal_mask``;
- positions that cannot restart per document: a forward without ``position_ids`` and an absolute
  position table added to the embeddings (one of width ``hidden_size``; rotary tables are per head);
- a few models whose mask-independent mixing cannot be read off their modules (`_MEASURED_WRONG`, each
  with its cause).

RoBERTa-style embeddings (a position table with ``padding_idx``, positions starting at
``padding_idx + 1``) are supported when the forward takes ``position_ids``: `position_offset` says by how
much the per-document positions must be shifted (`enable_packing` does it).
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ._originals import MASK_BUILDERS

__all__ = ["PackingSupport", "check_packing_support"]

# Layer kinds whose attention the document mask covers (transformers' names in config.layer_types).
# "indexed_attention" (DeepSeek sparse attention) selects keys with an indexer that sees the same mask.
ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "indexed_attention"})
_SUPPORT_FLAGS = {"sdpa": "_supports_sdpa", "flex_attention": "_supports_flex_attn"}
# Last resort, by config.model_type: mixing across positions that no module, config field or forward
# parameter shows. Each entry states the cause.
_MEASURED_WRONG = {
    "bloom": "its ALiBi bias is built from attention_mask.cumsum(), which document ids turn into wrong positions",
    "blt": "its patcher groups bytes into patches over the whole row, across document boundaries",
    "doge": (
        "its dynamic-mask attention (prepare_dynamic_mask) mixes its own key scores into the mask; measured "
        "wrong when packed, the exact operation not isolated"
    ),
}


@dataclass(frozen=True)
class PackingSupport:
    """The verdict of `check_packing_support`: supported, else the reason."""

    supported: bool
    reason: str | None = None
    backend: str | None = None
    position_offset: int = 0  # added to per-document positions (RoBERTa-style embeddings: padding_idx + 1)

    def __bool__(self) -> bool:
        return self.supported


def text_config(config: Any) -> Any:
    """The decoder's config: ``get_text_config()`` of a composite config, else the config itself."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def _text_modules(model: torch.nn.Module, text: Any) -> list[tuple[str, torch.nn.Module]]:
    """Modules that see the packed text: all but the subtrees of sub-models with another (vision, audio, ...)
    config, which a text-only packed batch never runs."""

    own = {id(model.config), id(text)}
    skip: list[str] = []
    found = []
    for name, module in model.named_modules():
        if any(name.startswith(s + ".") for s in skip):
            continue
        if module is not model and _is_other_tower(module, own):
            skip.append(name)
            continue
        found.append((name, module))
    return found


def _is_other_tower(module: torch.nn.Module, own: set[int]) -> bool:
    from transformers import PreTrainedModel

    if not isinstance(module, PreTrainedModel):
        return False
    config = module.config
    return id(config) not in own and id(text_config(config)) not in own


def _forward_parameters(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(type(model).forward).parameters)


def _layer_types_reason(text: Any) -> str | None:
    layer_types = getattr(text, "layer_types", None) or ()
    if "chunked_attention" in layer_types or getattr(text, "attention_chunk_size", None):
        return (
            f"it has chunked attention (attention_chunk_size={getattr(text, 'attention_chunk_size', None)}): "
            "the chunks follow absolute positions in the packed row, not positions in each document"
        )
    other = sorted({t for t in layer_types if t not in ATTENTION_LAYER_TYPES})
    if other:
        return (
            f"its config.layer_types has {other} layers, whose state crosses document boundaries that a mask "
            "cannot split"
        )
    return None


def _sequence_mixer_reason(modules: list[tuple[str, torch.nn.Module]]) -> str | None:
    convs = [name for name, m in modules if isinstance(m, torch.nn.Conv1d)]
    if convs:
        return (
            f"{convs[0]} is a Conv1d over the sequence (a short convolution of a recurrent / SSM / linear-attention "
            f"mixer; {len(convs)} such modules): it reads tokens of the previous document"
        )
    return None


def _mask_builder_reason(modules: list[tuple[str, torch.nn.Module]]) -> str | None:
    names = {type(m).__module__ for _, m in modules if type(m).__module__.startswith("transformers.models.")}
    if not names:
        return None
    for name in names:
        module = sys.modules.get(name)
        if module is not None and any(builder in vars(module) for builder in MASK_BUILDERS):
            return None
    return (
        f"its modeling code ({', '.join(sorted(names))}) builds attention masks itself, not through transformers' "
        f"{' / '.join(MASK_BUILDERS)}, so the document ids never reach its attention"
    )


def _position_tables(
    model: torch.nn.Module, modules: list[tuple[str, torch.nn.Module]], hidden: Any
) -> list[tuple[str, torch.nn.Embedding]]:
    """Absolute position tables: embeddings other than the token embedding, of width ``hidden_size``."""
    try:
        tokens = model.get_input_embeddings()
    except NotImplementedError:  # sub-models transformers cannot resolve (blt's): no token table to exclude
        tokens = None
    keys = ("max_position_embeddings", "max_target_positions")
    sizes = {
        v for c in (model.config, hidden) for v in (getattr(c, k, None) for k in keys) if isinstance(v, int)
    }
    width = getattr(hidden, "hidden_size", None) or getattr(hidden, "d_model", None)
    tables = []
    for name, m in modules:
        if not isinstance(m, torch.nn.Embedding) or m is tokens or m.embedding_dim != width:
            continue
        # a table indexed by position: as long as the maximum length (+ a small offset, BART/RoBERTa)
        if any(0 <= m.num_embeddings - s <= 2 + (m.padding_idx or 0) for s in sizes):
            tables.append((name, m))
    return tables


def model_config(model: Any) -> Any:
    """`model`'s config, after checking that `model` is a transformers model (TypeError otherwise)."""
    config = getattr(model, "config", None)
    if (
        not isinstance(model, torch.nn.Module)
        or config is None
        or not hasattr(config, "_attn_implementation")
    ):
        raise TypeError(
            f"model must be a transformers PreTrainedModel (an nn.Module with a config), got {type(model).__name__}"
        )
    return config


def check_packing_support(model: torch.nn.Module, backend: str | None = None) -> PackingSupport:
    """Whether packing can make `model` exact (per-document results) on `backend` (default: its current one)."""
    config = model_config(model)
    if backend is None:
        backend = text_config(config)._attn_implementation or config._attn_implementation
    reason, offset = _reason(model, config, backend)
    if reason is not None:
        model_type = getattr(config, "model_type", type(model).__name__)
        return PackingSupport(False, f"{model_type} ({type(model).__name__}): {reason}", backend)
    return PackingSupport(True, None, backend, offset)


def _reason(model: torch.nn.Module, config: Any, backend: str | None) -> tuple[str | None, int]:
    text = text_config(config)
    params = _forward_parameters(model)
    if "attention_mask" not in params:
        return "its forward takes no attention_mask", 0
    reason = _layer_types_reason(text)
    if reason is not None:
        return reason, 0
    modules = _text_modules(model, text)
    for find in (_sequence_mixer_reason, _mask_builder_reason):
        reason = find(modules)
        if reason is not None:
            return reason, 0
    model_type = getattr(config, "model_type", None)
    if model_type in _MEASURED_WRONG:
        return _MEASURED_WRONG[model_type], 0
    offset = 0
    tables = _position_tables(model, modules, text)
    if tables:
        name, table = tables[0]
        if "position_ids" not in params:
            return (
                f"its forward takes no position_ids and {name} is an absolute position table: positions would run "
                "on across the packed row instead of restarting per document",
                0,
            )
        if table.padding_idx is not None:
            offset = table.padding_idx + 1  # RoBERTa-style: create_position_ids_from_input_ids
    flag = _SUPPORT_FLAGS.get(backend)
    if flag is not None and not getattr(model, flag, False):
        return f"transformers does not support attn_implementation={backend!r} for it ({flag} is False)", 0
    return None, offset
