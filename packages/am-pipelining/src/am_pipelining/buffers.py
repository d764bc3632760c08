"""init_hf_model_buffers: materialise non-persistent buffers (rotary inv_freq, embed scales) off meta."""

from __future__ import annotations

import torch
from torch import nn

from ._args import require_device, require_module
from ._contract import transformers_version


def _rebuild_rotary(module: nn.Module, device: torch.device) -> None:
    # Constructors differ across transformers versions (5.3: (config, device=None[, layer_type]);
    # 5.23: (config)), but all take the config first and build their buffers on the default device.
    with torch.device(device):
        fresh = type(module)(module.config)
    for name, buf in fresh.named_buffers(recurse=False):
        if name in module._buffers:
            module._buffers[name] = buf
    for name, value in vars(fresh).items():
        if name.endswith("attention_scaling") and not isinstance(value, torch.Tensor):
            setattr(module, name, value)


def init_hf_model_buffers(model: nn.Module, device: torch.device | str) -> None:
    """Initialise the non-persistent buffers of a model built on the meta device, on `device`.

    Rotary embeddings (any module with an `inv_freq`-style buffer and a `config`) are rebuilt with the
    installed transformers' own constructor, which covers per-layer-type buffers (Gemma3/Gemma4 keep
    `{layer_type}_inv_freq`); scaled word embeddings get `embed_scale` from `scalar_embed_scale`.
    Raises RuntimeError naming any non-persistent buffer still on meta afterwards.
    """
    require_module(model, "init_hf_model_buffers")
    device = require_device(device, "init_hf_model_buffers")
    for module in model.modules():
        buffers = dict(module.named_buffers(recurse=False))
        if any(b.endswith("inv_freq") for b in buffers) and getattr(module, "config", None) is not None:
            _rebuild_rotary(module, device)
        if "embed_scale" in buffers and hasattr(module, "scalar_embed_scale"):
            module._buffers["embed_scale"] = torch.tensor(module.scalar_embed_scale, device=device)
    left = []
    for name, module in model.named_modules():
        non_persistent = getattr(module, "_non_persistent_buffers_set", set())
        for bname, buf in module.named_buffers(recurse=False):
            if bname in non_persistent and buf is not None and buf.is_meta:
                left.append(f"{name}.{bname}" if name else bname)
    if left:
        raise RuntimeError(
            f"init_hf_model_buffers: cannot initialise non-persistent buffers {left} of "
            f"{type(model).__name__} (installed transformers {transformers_version()}); they stay on meta"
        )
