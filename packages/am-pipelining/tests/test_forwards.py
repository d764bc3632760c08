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

ARCHS = [
    "llama",
    "qwen3",
    "qwen2_sliding",
    "mistral",
    "gemma3",
    "mistral3",
    "qwen2_vl",
    "gemma4",
    "gemma4_vlm",
]
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


def _qwen2_vl_positions(kind: str, batch: int, seq: int) -> torch.Tensor:
    text = torch.arange(seq).expand(batch, -1) + 3  # offset: the rotary must really read them
    if kind == "2d":
        return text
    if kind == "3d":
        return text[None].expand(3, -1, -1)
    # [4, B, S]: transformers' packed layout, text row first; two documents per row (6 + 6 tokens)
    packed = torch.cat([torch.arange(seq // 2), torch.arange(seq - seq // 2)]).expand(batch, -1)
    return packed[None].expand(4, -1, -1)


@pytest.mark.parametrize("kind", ["2d", "3d", "4d_packed"])
@pytest.mark.parametrize("num_stages", [2, 4])
def test_qwen2_vl_stages_take_2d_and_3d_positions(kind, num_stages):
    # Qwen2-VL's rotary wants [3, B, S] mrope positions (on transformers 5.3/5.5 it indexes them so),
    # while the mask builders want [B, S] text positions; the stage forward gives each its own.
    model = tm.build("qwen2_vl")
    ids, _ = _inputs("qwen2_vl")
    positions = _qwen2_vl_positions(kind, *ids.shape)
    with torch.no_grad():
        ref = model(input_ids=ids, position_ids=positions, use_cache=False).logits
        out = _chain(split_model_into_stages(model, num_stages), ids, {}, position_ids=positions)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    if kind == "4d_packed":
        # the packed text row gives per-document masks: the second document ignores the first
        with torch.no_grad():
            doc2 = model(input_ids=ids[:, 6:], use_cache=False).logits
        torch.testing.assert_close(out[:, 6:], doc2, atol=ATOL, rtol=0)


def test_qwen2_vl_text_only_3d_packed_positions_mask_per_document():
    # Three identical rows are text-only positions: the masks use them, so packing works as with 2D.
    model = tm.build("qwen2_vl")
    ids, _ = _inputs("qwen2_vl")
    packed = torch.cat([torch.arange(6), torch.arange(6)]).expand(2, -1)
    stages = split_model_into_stages(model, 2)
    with torch.no_grad():
        out = _chain(stages, ids, {}, position_ids=packed[None].expand(3, -1, -1))
        doc2 = model(input_ids=ids[:, 6:], use_cache=False).logits
    torch.testing.assert_close(out[:, 6:], doc2, atol=ATOL, rtol=0)


def test_3d_positions_rejected_for_non_mrope_models():
    stage = split_model_into_stages(tm.build("llama"), 2)[0]
    with pytest.raises(ValueError, match=r"\[3, batch, seq\].*\(3, 2, 12\)"):
        stage(torch.ones(2, 12, dtype=torch.long), position_ids=torch.arange(12).expand(3, 2, -1))
