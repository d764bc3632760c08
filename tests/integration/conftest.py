"""Integration tests: all five packages composed on am-cli's built-in tiny models.

The autouse fixture fails any test that leaves a process-global transformers object changed
(mask builders, attention registries, flash-attention's unpad helper, the mask builders bound in
imported modeling modules): every package's undo must have run by the end of each test.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import torch

# `integration_stack` (shared helpers) sits next to this file; the name is unique across test dirs.
sys.path.insert(0, str(Path(__file__).parent))

_BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


def _global_state() -> dict[str, Any]:
    import transformers.masking_utils as mu
    import transformers.modeling_flash_attention_utils as fu
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    state: dict[str, Any] = {f"masking_utils.{b}": getattr(mu, b) for b in _BUILDERS}
    state["modeling_flash_attention_utils._get_unpad_data"] = fu._get_unpad_data
    state["AttentionInterface._global_mapping"] = dict(AttentionInterface._global_mapping)
    state["AttentionMaskInterface._global_mapping"] = dict(AttentionMaskInterface._global_mapping)
    state["torch.nn.functional.scaled_dot_product_attention"] = (
        torch.nn.functional.scaled_dot_product_attention
    )
    state["torch.nn.functional.cross_entropy"] = torch.nn.functional.cross_entropy
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers.models.") and module is not None:
            for builder in _BUILDERS:
                if builder in vars(module):
                    state[f"{name}.{builder}"] = vars(module)[builder]
    return state


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    changed = []
    for key, value in after.items():
        if key not in before:
            # A modeling module imported during the test must hold transformers' own builder.
            builder = key.rsplit(".", 1)[1]
            if builder in _BUILDERS and value is not before[f"masking_utils.{builder}"]:
                changed.append(f"{key} (imported during the test, holds {value!r})")
        elif isinstance(value, dict):
            if value.keys() != before[key].keys() or any(value[k] is not before[key][k] for k in value):
                changed.append(f"{key}: {sorted(set(value) ^ set(before[key]))} added/removed or replaced")
        elif value is not before[key]:
            changed.append(f"{key}: {before[key]!r} -> {value!r}")
    return changed


@pytest.fixture(autouse=True)
def _restores_global_state():
    torch.set_num_threads(1)
    before = _global_state()
    yield
    changed = _changed(before, _global_state())
    assert not changed, f"test left process-global transformers/torch state changed: {changed}"
