from __future__ import annotations

import pytest

from am_attention import (
    DEFAULT_ATTN_IMPLEMENTATION,
    PACKED_SEQUENCE_BACKENDS,
    apply_preload_overrides,
    next_fallback_attn,
    verify_sdpa_support,
)
from am_attention.selection import ATTN_PRIORITY, HAS_FLASH_ATTN


def test_default_follows_flash_attn_availability():
    assert DEFAULT_ATTN_IMPLEMENTATION == ("flash_attention_2" if HAS_FLASH_ATTN else "sdpa")


@pytest.mark.parametrize(
    ("impl", "expected"),
    [
        ("flash_attention_4", "flash_attention_3"),
        ("flash_attention_3", "flash_attention_2"),
        ("flash_attention_2", "sdpa"),
        ("sdpa", "eager"),
        ("eager", "eager"),
        ("flex_attention", "eager"),
        ("nonsense", "eager"),
    ],
)
def test_next_fallback_steps_down_one(impl, expected):
    assert next_fallback_attn(impl) == expected
    assert ATTN_PRIORITY[0] == "eager"


@pytest.mark.parametrize("impl", PACKED_SEQUENCE_BACKENDS)
def test_packed_keeps_every_exact_backend(impl):
    assert apply_preload_overrides(1, 1, True, impl, True) == (impl, True)


def test_packed_steps_down_to_an_exact_backend():
    assert apply_preload_overrides(1, 1, True, "flash_attention_4", False) == ("flash_attention_3", False)
    assert apply_preload_overrides(1, 1, True, "mystery", False) == ("eager", False)


def test_parallelism_overrides():
    assert apply_preload_overrides(2, 1, False, "flash_attention_2", True) == ("flash_attention_2", False)
    assert apply_preload_overrides(1, 2, False, "flash_attention_2", True) == ("sdpa", False)
    assert apply_preload_overrides(1, 2, False, "magi", True) == ("magi", False)
    with pytest.raises(ValueError, match="cp_size"):
        apply_preload_overrides(1, 2, True, "sdpa", False)
    with pytest.raises(ValueError, match="tp_size"):
        apply_preload_overrides(0, 1, False, "sdpa", False)
    with pytest.raises(TypeError):
        apply_preload_overrides(1, 1, False, None, False)


def test_verify_sdpa_support():
    class Yes:
        _supports_sdpa = True

    class No:
        _supports_sdpa = False

    verify_sdpa_support(No(), 1)
    verify_sdpa_support(Yes(), 4)
    with pytest.raises(ValueError, match="No does not support SDPA"):
        verify_sdpa_support(No(), 2)
