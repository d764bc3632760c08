"""Shared fixtures: tiny models from configs and a guard that fails any test leaking a patch."""

from __future__ import annotations

import gc

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
    from am_attention import (
        reset_te_attention_stats,
        te_backend,
        unpatch_legacy_flash_attn_flag,
        unregister_te_attention_backend,
    )

    before = _snapshot()
    reset_te_attention_stats()
    yield
    if te_backend.live_leases():
        gc.collect()  # an injected model dropped without undo gives its lease back when collected
    leases = te_backend.live_leases()
    after = _snapshot()
    leaked = [k for k in before if before[k] != after[k]]
    # clean up so one leak does not cascade, then fail
    if not leases:
        unregister_te_attention_backend()
    unpatch_legacy_flash_attn_flag()
    assert not leases, f"test left {leases} injected modules alive"
    assert not leaked, f"test leaked patches: {leaked}"
    assert not te_backend.is_te_attention_backend_registered(), "test left the 'te' backend registered"
