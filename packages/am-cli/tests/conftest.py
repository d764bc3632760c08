"""am-cli tests: every doctor run must leave transformers exactly as it found it."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _no_leaked_patches():
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as flash_utils
    from transformers import AttentionInterface, AttentionMaskInterface

    before = (
        masking.create_causal_mask,
        masking.create_sliding_window_causal_mask,
        flash_utils._get_unpad_data,
        dict(AttentionInterface._global_mapping),
        dict(AttentionMaskInterface._global_mapping),
    )
    yield
    after = (
        masking.create_causal_mask,
        masking.create_sliding_window_causal_mask,
        flash_utils._get_unpad_data,
        dict(AttentionInterface._global_mapping),
        dict(AttentionMaskInterface._global_mapping),
    )
    assert after == before, "a doctor run left a patch behind"


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
