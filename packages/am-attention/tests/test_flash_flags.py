from __future__ import annotations

import transformers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedModel

from am_attention import patch_legacy_flash_attn_flag, unpatch_legacy_flash_attn_flag


class Legacy(PreTrainedModel):
    config_class = LlamaConfig
    _supports_flash_attn_2 = True


class Plain(PreTrainedModel):
    config_class = LlamaConfig


class NewStyleOff(PreTrainedModel):
    config_class = LlamaConfig
    _supports_flash_attn = False
    _supports_flash_attn_2 = True


def _flag(cls):
    obj = object.__new__(cls)  # the property reads only the class hierarchy
    return obj._supports_flash_attn


def test_bridge_reads_legacy_flag_and_undo_restores():
    original = vars(PreTrainedModel)["_supports_flash_attn"]
    assert _flag(Legacy) is False
    handle = patch_legacy_flash_attn_flag()
    try:
        assert patch_legacy_flash_attn_flag() is handle
        assert _flag(Legacy) is True
        assert _flag(Plain) is False
        assert _flag(NewStyleOff) is False  # an explicit new flag wins
        assert _flag(LlamaForCausalLM) is True
    finally:
        unpatch_legacy_flash_attn_flag()
    assert vars(PreTrainedModel)["_supports_flash_attn"] is original
    assert _flag(Legacy) is False
    unpatch_legacy_flash_attn_flag()  # undo twice is a no-op


def test_flash_attention_check_accepts_legacy_model_when_bridged():
    """The checks transformers runs on `_supports_flash_attn` (FA3 on 5.3, FA2/FA3 on 5.5+) see the legacy flag."""
    model = object.__new__(Legacy)
    with patch_legacy_flash_attn_flag():
        assert model._supports_flash_attn is True
    assert model._supports_flash_attn is False
    assert transformers.__version__
