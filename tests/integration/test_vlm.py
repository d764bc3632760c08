"""Mistral3 VLM with images through the stack (not packed): pixel_values enter on pipeline stage 0.

Reference: the unpatched, unsplit model's own forward with `labels` (transformers merges the image
features and computes the loss); the stack must give the same loss and gradients, vision tower included.
"""

from __future__ import annotations

import contextlib
import copy

import integration_stack as stack
import pytest
import torch

from am_attention import (
    ReferenceDotProductAttention,
    get_te_attention_stats,
    inject_te_attention,
    reset_te_attention_stats,
)
from am_cli.tiny_models import build_model
from am_pipelining import split_model_into_stages
from am_precision import cast_model_to_dtype

IMAGE_TOKENS = 4  # one 32x32 image, 8x8 patches -> 4x4, spatial merge 2 -> 4 tokens


def _inputs(config, rows: int = 2, seq: int = 16):
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(3, config.text_config.vocab_size - 8, (rows, seq), generator=generator)
    ids[:, 2 : 2 + IMAGE_TOKENS] = config.image_token_index
    pixel_values = torch.randn(rows, 3, 32, 32, generator=generator)
    image_sizes = torch.tensor([[32, 32]] * rows)
    labels = ids.masked_fill(ids == config.image_token_index, stack.IGNORE_INDEX)
    return ids, pixel_values, image_sizes, labels


@pytest.mark.parametrize("arch", stack.arch_params(["mistral3"]))
def test_mistral3_images_on_stage0_step_equals_unsplit(arch: str) -> None:
    config = stack.stack_config(arch)
    reference = build_model(config, seed=0)
    model = copy.deepcopy(reference)
    ids, pixel_values, image_sizes, labels = _inputs(config)

    out = reference(
        input_ids=ids, pixel_values=pixel_values, image_sizes=image_sizes, labels=labels, use_cache=False
    )
    out.loss.backward()
    with torch.no_grad():  # control: the images change the numbers, so dropping them would be caught
        text_only = reference(input_ids=ids, use_cache=False).logits
    assert (text_only - out.logits).abs().max() > 1e-3

    cast_model_to_dtype(model, torch.float32)
    stages = split_model_into_stages(model, 2)
    assert stages[1].model.vision_tower is None and stages[0].model.vision_tower is not None
    with contextlib.ExitStack() as patches:
        for stage in stages:
            patches.enter_context(
                inject_te_attention(stage, dot_product_attention_cls=ReferenceDotProductAttention)
            )
        reset_te_attention_stats()
        hidden = stages[0](ids, pixel_values=pixel_values, image_sizes=image_sizes)
        logits = stages[1](hidden)
        loss = reference.loss_function(logits=logits, labels=labels, vocab_size=config.text_config.vocab_size)
        loss.backward()
        te_stats = get_te_attention_stats()

    # The 4 text layers run the kernel on a causal mask (BSHD); the vision tower attends over both
    # images' patches with a block-diagonal mask, which TE does not take: counted fallbacks, SDPA numbers.
    text_layers, vision_layers = config.text_config.num_hidden_layers, config.vision_config.num_hidden_layers
    assert te_stats["te_hits"] == text_layers and te_stats["te_thd_hits"] == 0, te_stats
    assert te_stats["fallback_mask"] == vision_layers, te_stats
    assert sum(v for k, v in te_stats.items() if k.startswith("fallback_")) == vision_layers, te_stats
    torch.testing.assert_close(logits, out.logits, atol=stack.LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(loss, out.loss, atol=stack.LOSS_ATOL, rtol=0)
    stack.assert_stage_grads_match(stages, reference)
    vision = [n for n, p in stages[0].named_parameters() if "vision_tower" in n and p.grad is not None]
    assert vision, "no gradient reached the vision tower"
