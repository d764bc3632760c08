"""What the decoder applies before its first layer and after its last, and the causal LM's own head step.

The prologue is not re-implemented: `decoder_prologue` runs the decoder's own forward on a shallow
copy holding only the stage's layers and stops it when the first layer is called, so whatever the
decoder does to the embeddings (added positions, scales, a norm) is exactly what the stage gets.

The final modules are the decoder children the unsplit forward runs between the last layer and the
head: the `base_model_pp_plan` entries after `layers` where the config has a plan, else the children
registered after `layers` that are neither rotary embeddings (they hold an `inv_freq` buffer),
dropout, containers nor Gemma-style per-layer-input modules (stage 0 owns those). The head step is
not re-implemented at all: `causal_lm_logits` runs the causal LM's own forward with its backbone
replaced by the stage's hidden states, so logit scales, hidden-state scalings and softcapping are
exactly those of the installed transformers, under whatever names the model uses.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch
from torch import nn

# Gemma4's per-layer-input embedding lives next to embed_tokens and belongs to stage 0.
STAGE0_DECODER_EXTRAS = ("embed_tokens_per_layer", "per_layer_model_projection", "per_layer_projection_norm")


def _plan_keys(decoder: nn.Module) -> list[str]:
    plan = getattr(getattr(decoder, "config", None), "base_model_pp_plan", None)
    return list(plan) if plan else []


def input_embedding_name(decoder: nn.Module) -> str:
    """The input embedding's attribute: the first `base_model_pp_plan` entry, else `embed_tokens`."""
    keys = _plan_keys(decoder)
    return keys[0] if keys and "layers" in keys[1:] else "embed_tokens"


class _FirstLayerReached(Exception):
    """Raised by the first layer's pre-hook to stop the decoder's forward with that layer's input."""

    def __init__(self, hidden_states: torch.Tensor) -> None:
        super().__init__("first decoder layer reached")
        self.hidden_states = hidden_states


def _stop_at_first_layer(_module: nn.Module, args: tuple, kwargs: dict) -> None:
    hidden = args[0] if args else kwargs.get("hidden_states")
    raise _FirstLayerReached(hidden)


def decoder_prologue(
    decoder: nn.Module,
    input_ids: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None,
    attention_mask: Any,
    position_ids: torch.Tensor | None,
    layers: list[nn.Module],
) -> torch.Tensor:
    """The hidden states the decoder's own forward hands its first layer, for token ids or embeddings.

    `layers` are the layers the stage holds (the first one is the model's first); the decoder's forward
    runs on a shallow copy whose `layers` is a ModuleList of them, so a cut decoder works as well.
    """
    shadow = copy.copy(decoder)
    shadow._modules = dict(decoder._modules)
    shadow._modules["layers"] = nn.ModuleList(layers)
    handle = layers[0].register_forward_pre_hook(_stop_at_first_layer, with_kwargs=True)
    try:
        type(decoder).forward(
            shadow,
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
        )
    except _FirstLayerReached as reached:
        return reached.hidden_states
    finally:
        handle.remove()
    raise RuntimeError(
        f"{type(decoder).__qualname__}.forward returned without calling its first layer "
        f"({type(layers[0]).__name__}); the pipeline stage cannot take its input from it"
    )


def _is_rotary(module: nn.Module) -> bool:
    return any(name.endswith("inv_freq") for name, _ in module.named_buffers(recurse=False))


def _is_final_candidate(name: str, module: nn.Module | None) -> bool:
    if module is None:  # dropped by the cut: still a final module of the stage that owns it
        return True
    if name in STAGE0_DECODER_EXTRAS or _is_rotary(module):
        return False
    return not isinstance(module, (nn.Dropout, nn.ModuleList, nn.ModuleDict, nn.Sequential))


def final_module_names(decoder: nn.Module) -> tuple[str, ...]:
    """Attribute names of the modules the decoder applies after its last layer, in order (see module doc).

    Works on a cut stage too: children set to None by the cut keep their place in `_modules`.
    """
    keys = _plan_keys(decoder)
    if "layers" in keys:
        return tuple(keys[keys.index("layers") + 1 :])
    names = list(decoder._modules)
    if "layers" not in names:
        return ()
    after = names[names.index("layers") + 1 :]
    return tuple(n for n in after if _is_final_candidate(n, decoder._modules[n]))


def apply_final_modules(decoder: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """Run the final modules this (possibly cut) decoder still holds."""
    for name in final_module_names(decoder):
        module = getattr(decoder, name, None)
        if module is not None:
            hidden_states = module(hidden_states)
    return hidden_states


class _BackboneOutput:
    """The backbone output the causal LM's forward reads: `last_hidden_state` (also `[0]`), all else None.

    A stage has no router logits, attentions or cache to report; None is what the unsplit
    backbone returns for them when they are not requested.
    """

    def __init__(self, hidden_states: torch.Tensor) -> None:
        self.last_hidden_state = hidden_states

    def __getattr__(self, name: str) -> None:
        if name.startswith("__"):
            raise AttributeError(name)
        return None

    def __getitem__(self, key: Any) -> Any:
        if key == 0 or key == "last_hidden_state":
            return self.last_hidden_state
        if isinstance(key, slice):
            return (self.last_hidden_state,)[key]
        raise KeyError(key)


class _GivenHidden(nn.Module):
    """Stands in for the backbone inside the causal LM's forward: returns the stage's hidden states."""

    def __init__(self, hidden_states: torch.Tensor) -> None:
        super().__init__()
        self.hidden_states = hidden_states

    def forward(self, *args: Any, **kwargs: Any) -> _BackboneOutput:
        return _BackboneOutput(self.hidden_states)


def backbone_attr(model: nn.Module, decoder: nn.Module) -> str | None:
    """The child of `model` that holds `decoder` (None when `model` is the decoder itself)."""
    for name, child in model.named_children():
        if child is decoder or any(sub is decoder for sub in child.modules()):
            return name
    return None


def _accepts(fn: Any, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # an unreadable signature names nothing
        return False


def causal_lm_logits(
    model: nn.Module, decoder: nn.Module, hidden_states: torch.Tensor, logits_to_keep: Any = 0
) -> torch.Tensor:
    """Logits of `model`'s own forward for a backbone that returned `hidden_states` (its final modules applied).

    A shallow copy of `model` whose backbone child is replaced runs the class forward, so everything
    the causal LM does between the backbone and the returned logits is applied, and nothing else.
    """
    attr = backbone_attr(model, decoder)
    if attr is None:
        raise ValueError(f"{type(decoder).__name__} is not a submodule of {type(model).__name__}")
    shadow = copy.copy(model)
    # A new child dict: the shadow's backbone swap must not reach `model`.
    shadow._modules = dict(model._modules)
    shadow._modules[attr] = _GivenHidden(hidden_states)
    forward = type(model).forward
    kwargs: dict[str, Any] = {"input_ids": None, "inputs_embeds": hidden_states, "use_cache": False}
    if _accepts(forward, "logits_to_keep"):
        kwargs["logits_to_keep"] = 0 if logits_to_keep is None else logits_to_keep
    elif logits_to_keep not in (None, 0):
        raise ValueError(f"{type(model).__name__}.forward takes no logits_to_keep, got {logits_to_keep!r}")
    out = forward(shadow, **kwargs)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0]
    return logits
