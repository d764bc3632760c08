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
