"""Patched forwards chained stage by stage equal the unpatched model (fp32)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from am_pipelining import (
    create_pipeline_forward_gemma4_text,
    create_pipeline_forward_gemma4_vlm,
    split_model_into_stages,
)
from am_pipelining._contract import transformers_version

ARCHS = ["llama", "qwen3", "qwen2_sliding", "mistral", "gemma3", "mistral3", "gemma4", "gemma4_vlm"]
ATOL = 1e-5  # fp32: the stages run exactly the unsplit model's ops, only the call path differs


def _skip_missing(arch: str) -> None:
    if arch.startswith("gemma4") and not tm.has_gemma4():
        pytest.skip(f"transformers {transformers_version()} has no gemma4")


def _inputs(arch: str):
    if arch == "mistral3":
        ids, pixel_values, image_sizes = tm.mistral3_inputs()
        return ids, {"pixel_values": pixel_values, "image_sizes": image_sizes}
    g = torch.Generator().manual_seed(3)
    return torch.randint(20, tm.VOCAB, (2, 12), generator=g), {}


def _chain(stages, ids, stage0_kwargs, **kwargs):
    x = stages[0](ids, **stage0_kwargs, **kwargs)
    for stage in stages[1:]:
        x = stage(x, **kwargs)
    return x


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("num_stages", [2, 4])
def test_chained_stages_equal_unsplit_logits(arch, num_stages):
    _skip_missing(arch)
    model = tm.build(arch)
    ids, extra = _inputs(arch)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False, **extra).logits
        out = _chain(split_model_into_stages(model, num_stages), ids, extra)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_mistral3_pixel_values_reach_stage0():
    model = tm.build("mistral3")
    ids, extra = _inputs("mistral3")
    stages = split_model_into_stages(model, 2)
    with torch.no_grad():
        with_images = _chain(stages, ids, extra)
        text_only = _chain(stages, ids, {})
    # The image tokens' embeddings are replaced by projected vision features on stage 0.
    assert (with_images - text_only).abs().max() > 1e-3
    with torch.no_grad():
        hidden = stages[0](ids, **extra)
        # Later stages get hidden states with the images already merged: pixel_values are not reused there.
        torch.testing.assert_close(stages[1](hidden, **extra), stages[1](hidden), atol=0, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2_sliding", "gemma3"])
def test_packed_position_ids_equal_unsplit(arch):
    model = tm.build(arch)
    ids, _ = _inputs(arch)
    pos = torch.stack(
        [torch.cat([torch.arange(5), torch.arange(7)]), torch.cat([torch.arange(9), torch.arange(3)])]
    )
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        plain_ref = model(input_ids=ids, use_cache=False).logits
        stages = split_model_into_stages(model, 2)
        plain = _chain(stages, ids, {})
        packed = _chain(stages, ids, {}, position_ids=pos)
    torch.testing.assert_close(plain, plain_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(packed, ref, atol=ATOL, rtol=0)
    assert (packed - plain).abs().max() > 1e-3  # packing changes the numbers, so reuse would be caught


def test_attention_mask_padding_equals_unsplit():
    model = tm.build("llama")
    ids, _ = _inputs("llama")
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        out = _chain(split_model_into_stages(model, 2), ids, {}, attention_mask=mask)
    torch.testing.assert_close(out[0, 4:], ref[0, 4:], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[1], ref[1], atol=ATOL, rtol=0)


def test_kv_cache_is_rejected():
    stages = split_model_into_stages(tm.build("llama"), 2)
    ids, _ = _inputs("llama")
    with pytest.raises(ValueError, match="use_cache=False"):
        stages[0](ids, use_cache=True)


def test_integer_ids_on_later_stage_raise():
    stages = split_model_into_stages(tm.build("llama"), 2)
    ids, _ = _inputs("llama")
    with pytest.raises(ValueError, match="previous stage's hidden states"):
        stages[1](ids)


@pytest.mark.skipif(tm.has_gemma4(), reason="this transformers has gemma4")
def test_gemma4_forwards_say_transformers_lacks_gemma4():
    for factory in (create_pipeline_forward_gemma4_text, create_pipeline_forward_gemma4_vlm):
        with pytest.raises(ImportError, match=transformers_version()):
            factory()
