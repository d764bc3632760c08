"""Shared fixtures: tiny models from configs and a guard that fails any test leaking a patch."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


def _snapshot() -> dict:
    from transformers import masking_utils, modeling_utils

    return {
        "attn": dict(modeling_utils.AttentionInterface._global_mapping),
        "mask": dict(masking_utils.AttentionMaskInterface._global_mapping),
        "flag": vars(modeling_utils.PreTrainedModel).get("_supports_flash_attn"),
    }


@pytest.fixture(autouse=True)
def no_leaked_patches():
    from am_attention import reset_te_attention_stats, te_backend, te_inject

    before = _snapshot()
    reset_te_attention_stats()
    yield
    after = _snapshot()
    leaked = [k for k in before if before[k] != after[k]]
    live_models = [m for m, h in te_inject._MODEL_HANDLES.items() if h.applied]
    # clean up so one leak does not cascade, then fail
    for model in live_models:
        te_inject.remove_te_attention(model)
    te_backend.unregister_te_attention_backend()
    from am_attention import unpatch_legacy_flash_attn_flag

    unpatch_legacy_flash_attn_flag()
    assert not leaked, f"test leaked patches: {leaked}"
    assert not live_models, "test left TE attention injected"
    assert not te_backend.is_te_attention_backend_registered(), "test left the 'te' backend registered"
