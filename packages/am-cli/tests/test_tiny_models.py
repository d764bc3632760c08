"""The built-in tiny architectures build and train-step on CPU for the installed transformers."""

from __future__ import annotations

import pytest
import torch

from am_cli.tiny_models import TINY_ARCHS, available_archs, build_config, build_model


@pytest.mark.parametrize("arch", available_archs())
def test_builds_and_runs(arch):
    model = build_model(build_config(arch))
    ids = torch.randint(3, 200, (1, 12))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in model.get_output_embeddings().parameters())


def test_unknown_arch_lists_the_known_ones():
    with pytest.raises(ValueError, match="llama"):
        build_config("gpt-17")


def test_gemma4_matches_the_installed_transformers():
    import importlib.util

    has = importlib.util.find_spec("transformers.models.gemma4") is not None
    assert ("gemma4" in available_archs()) == has
    if not has:
        with pytest.raises(ValueError, match="does not have"):
            build_config("gemma4")
    assert set(TINY_ARCHS) >= {"llama", "qwen2", "qwen3", "mistral", "gemma3", "qwen2-vl", "mistral3"}


def test_overrides_resize_and_keep_the_layout():
    config = build_config("gemma3", num_hidden_layers=3, hidden_size=32, vocab_size=128)
    assert (config.num_hidden_layers, config.hidden_size, config.vocab_size) == (3, 32, 128)
    assert config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert build_config("mistral", sliding_window=4).sliding_window == 4
    vlm = build_config("qwen2-vl", vocab_size=128)
    assert vlm.text_config.vocab_size == 128 and vlm.image_token_id < 128
    assert build_config("llama").to_dict() == build_config("llama").to_dict()  # deterministic
