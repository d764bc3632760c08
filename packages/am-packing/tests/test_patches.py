"""configure_packing: coverage of imported and later-imported modules, flash unpadding, pass-through rules."""

from __future__ import annotations

import importlib
import inspect
import sys

import pytest
import torch

import am_packing
from am_packing import (
    configure_packing,
    find_causal_mask_modules,
    get_attn_implementation,
    unconfigure_packing,
)
from am_packing._contract import parameter_name
from am_packing._patch import patch_name


def test_already_imported_modules_are_patched_and_restored():
    import transformers.masking_utils as masking
    import transformers.models.llama.modeling_llama as llama
    import transformers.models.mistral.modeling_mistral as mistral

    original = masking.create_causal_mask
    with configure_packing("sdpa"):
        assert llama.create_causal_mask is am_packing.create_causal_mask
        assert mistral.create_sliding_window_causal_mask is am_packing.create_sliding_window_causal_mask
        assert patch_name(llama.create_causal_mask) == "am_packing.create_causal_mask"
    assert llama.create_causal_mask is original is masking.create_causal_mask


def test_passthrough_exposes_the_signature_it_forwards_to():
    """Signature-keyed callers (parameter_name, am-pipelining's mask cache) can adapt while packing is on."""
    import transformers.masking_utils as masking

    originals = {b: getattr(masking, b) for b in ("create_causal_mask", "create_sliding_window_causal_mask")}
    with configure_packing("sdpa"):
        for builder, original in originals.items():
            live = getattr(masking, builder)
            assert live is not original and inspect.signature(live) == inspect.signature(original)
            assert parameter_name(live, "past_key_values") == parameter_name(original, "past_key_values")


def test_module_imported_after_configure_is_covered_and_restored():
    candidates = [m for m in find_causal_mask_modules() if m not in sys.modules]
    name = next(
        m
        for m in candidates
        if m.rsplit(".", 1)[-1]
        in {
            "modeling_olmo",
            "modeling_phi3",
            "modeling_granite",
            "modeling_stablelm",
            "modeling_cohere",
            "modeling_olmo2",
        }
    )
    import transformers.masking_utils as masking

    original = masking.create_causal_mask
    configure_packing("eager")
    try:
        module = importlib.import_module(name)
        assert module.create_causal_mask is am_packing.create_causal_mask
    finally:
        unconfigure_packing()
    assert module.create_causal_mask is original


def test_flash_unpad_data_is_per_document():
    import transformers.modeling_flash_attention_utils as flash_utils

    mask = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 2, 2, 3, 3, 3]])
    original = flash_utils._get_unpad_data
    assert original(mask)[1].tolist() == [0, 8, 22]  # transformers sums ids: wrong for packed rows
    with configure_packing("flash_attention_2"):
        indices, cu, longest = flash_utils._get_unpad_data(mask)
        assert cu.tolist() == [0, 2, 5, 6, 8, 11] and longest == 3
        assert indices.tolist() == [0, 1, 2, 3, 4, 6, 7, 8, 9, 10, 11]
        # a 0/1 mask (left padding too) keeps transformers' result
        pad = torch.tensor([[0, 1, 1], [1, 1, 1]])
        ours, theirs = flash_utils._get_unpad_data(pad), original(pad)
        assert [t.tolist() for t in ours[:2]] == [t.tolist() for t in theirs[:2]] and ours[2] == theirs[2]


def _builder_kwargs(builder, **kwargs):
    """Keyword arguments for a mask builder (ours or transformers'): no cache, under the installed spelling."""
    original = am_packing.patches._original(builder.__name__)
    kwargs[parameter_name(original, "past_key_values")] = None
    if "cache_position" in inspect.signature(original).parameters:  # required on transformers 5.3
        kwargs["cache_position"] = torch.arange(kwargs["inputs_embeds"].shape[1])
    return kwargs


def test_flash_passthrough_returns_the_indexed_mask(make_model):
    """For flash/varlen backends the mask builder hands the indexed mask itself to attention."""
    import transformers.masking_utils as masking

    model = make_model("mistral", "sdpa")
    mask = torch.tensor([[1, 1, 2, 2, 0]])
    embeds = torch.zeros(1, 5, 32)
    with configure_packing("flash_attention_2"):
        model.config._attn_implementation = "flash_attention_2"
        try:
            for builder in (masking.create_causal_mask, masking.create_sliding_window_causal_mask):
                kwargs = _builder_kwargs(
                    builder, config=model.config, inputs_embeds=embeds, attention_mask=mask
                )
                assert builder(**kwargs) is mask
        finally:
            model.config._attn_implementation = "sdpa"


def test_plain_masks_go_to_transformers(make_model):
    """0/1 padding masks give exactly transformers' mask while packing is configured."""
    import transformers.masking_utils as masking

    model = make_model("llama", "eager")
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    kwargs = _builder_kwargs(
        masking.create_causal_mask,
        config=model.config,
        inputs_embeds=torch.zeros(2, 4, 32),
        attention_mask=mask,
    )
    expected = masking.create_causal_mask(**kwargs)
    with configure_packing("eager"):
        got = masking.create_causal_mask(**kwargs)
    torch.testing.assert_close(got, expected)


def test_invalid_mask_raises_through_the_model(make_model):
    model = make_model("llama", "sdpa")
    with configure_packing("sdpa"), pytest.raises(ValueError, match="row 0, position 2"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 3, 3]]))


def test_configure_rejects_unknown_backend():
    with pytest.raises(ValueError, match="paged"):
        configure_packing("paged|sdpa")


@pytest.mark.parametrize(
    ("cfg", "expected"),
    [
        ({"backend": {"attn": "te"}, "attn_implementation": "sdpa"}, "te"),
        ({"attn_implementation": "flash_attention_2"}, "flash_attention_2"),
        ({}, "sdpa"),
        (type("C", (), {"_attn_implementation": "eager"})(), "eager"),
        (type("B", (), {"backend": type("A", (), {"attn": "flex_attention"})()})(), "flex_attention"),
    ],
)
def test_get_attn_implementation(cfg, expected):
    assert get_attn_implementation(cfg) == expected
