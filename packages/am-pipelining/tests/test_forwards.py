"""Patched forwards chained stage by stage equal the unpatched model (fp32)."""

from __future__ import annotations

import pytest
import tiny_models as tm
import torch

from am_pipelining import (
    create_pipeline_forward_gemma4_text,
    create_pipeline_forward_gemma4_vlm,
    get_pipeline_problems,
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


def _changed_layer_types(model) -> None:
    config = model.config
    config.layer_types = ["full_attention"] * config.num_hidden_layers


def test_layer_types_changed_after_build_are_refused_or_exact():
    # transformers 5.3 decoders pick each layer's mask by the type the layer recorded when it was
    # built, 5.5+ by config.layer_types at call time. After the config changed, a stage forward cannot
    # know which one the installed decoder reads: it refuses where layers recorded a type that now
    # disagrees, and follows config.layer_types (as the decoder does) where they recorded none.
    model = tm.build("qwen2_sliding")
    _changed_layer_types(model)
    ids, _ = _inputs("qwen2_sliding")
    recorded = [getattr(layer, "attention_type", None) for layer in model.model.layers]
    if any(t is not None for t in recorded):
        match = r"'qwen2'.*layer 2 was built as 'sliding_attention'.*config\.layer_types\[2\].*rebuild"
        with pytest.raises(ValueError, match=match):
            split_model_into_stages(model, 2)
        assert any("rebuild the model" in p for p in get_pipeline_problems(model, num_stages=2))
        return
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        out = _chain(split_model_into_stages(model, 2), ids, {})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_layer_records_are_used_when_the_config_has_no_layer_types():
    # Mixed full/sliding Qwen2 whose config lost `layer_types`: where the decoder still runs (5.3, from
    # the types its layers recorded), the stages follow those records, not a sliding_window guess.
    model = tm.build("qwen2_sliding")
    ids, _ = _inputs("qwen2_sliding")
    model.config.layer_types = None
    with torch.no_grad():
        try:
            ref = model(input_ids=ids, use_cache=False).logits
        except TypeError:
            pytest.skip(f"transformers {transformers_version()}'s Qwen2 decoder needs config.layer_types")
        out = _chain(split_model_into_stages(model, 2), ids, {})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def _gemma3_image_inputs():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(20, tm.VOCAB, (2, 12), generator=g)
    ids[:, 2:6] = tm.IMAGE_TOKEN
    return ids, (ids == tm.IMAGE_TOKEN).long(), torch.randn(2, 3, 32, 32, generator=g)


def test_gemma3_vlm_text_equals_unsplit_and_image_inputs_are_refused():
    model = tm.build("gemma3_vlm")
    ids, _ = _inputs("gemma3_vlm")
    stages = split_model_into_stages(model, 2)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False).logits
        torch.testing.assert_close(_chain(stages, ids, {}), ref, atol=ATOL, rtol=0)
        image_ids, token_type_ids, pixel_values = _gemma3_image_inputs()
        with_types = model(input_ids=image_ids, pixel_values=pixel_values, token_type_ids=token_type_ids)
        without = model(input_ids=image_ids, pixel_values=pixel_values)
        # control: the unsplit model attends bidirectionally over the image tokens marked by token_type_ids
        assert (with_types.logits - without.logits).abs().max() > 1e-3
        hidden = stages[0](image_ids)
    refused = r"Gemma3ForConditionalGeneration \(model_type 'gemma3'\) was given {}.*{}"
    for stage, x in ((stages[0], image_ids), (stages[1], hidden)):
        with pytest.raises(ValueError, match=refused.format("token_type_ids", "bidirectional")):
            stage(x, token_type_ids=token_type_ids)
        with pytest.raises(ValueError, match=refused.format("pixel_values", "vision")):
            stage(x, pixel_values=pixel_values)
    stages[1](hidden, token_type_ids=None)  # None is what the stages apply anyway


def test_qwen2_vl_vision_inputs_are_refused_not_dropped():
    stage = split_model_into_stages(tm.build("qwen2_vl"), 2)[0]
    ids, _ = _inputs("qwen2_vl")
    for name, value in (
        ("pixel_values", torch.randn(16, 48)),
        ("image_grid_thw", torch.tensor([[1, 4, 4]])),
    ):
        with pytest.raises(ValueError, match=rf"\(model_type 'qwen2_vl'\) was given {name}"):
            stage(ids, **{name: value})


def test_mistral3_vision_feature_layer_is_applied():
    model = tm.build("mistral3")
    ids, extra = _inputs("mistral3")
    stages = split_model_into_stages(model, 2)
    with torch.no_grad():
        ref = model(input_ids=ids, use_cache=False, vision_feature_layer=-2, **extra).logits
        default = model(input_ids=ids, use_cache=False, **extra).logits
        out = _chain(stages, ids, {**extra, "vision_feature_layer": -2})
    assert (ref - default).abs().max() > 1e-4  # the layer choice changes the numbers
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.skipif(not tm.has_gemma4(), reason="no gemma4 in this transformers")
def test_gemma4_vlm_inputs_it_does_not_apply_are_refused():
    stage = split_model_into_stages(tm.build("gemma4_vlm"), 2)[0]
    ids, _ = _inputs("gemma4_vlm")
    with pytest.raises(
        ValueError, match=r"\(model_type 'gemma4'\) was given mm_token_type_ids.*bidirectional"
    ):
        stage(ids, mm_token_type_ids=torch.zeros_like(ids))
