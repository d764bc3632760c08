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
    pack_sequences,
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
        assert (
            mistral.create_sliding_window_causal_mask is am_packing.patches.create_sliding_window_causal_mask
        )
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


# --------------------------------------------------------------------------- issue 15 regressions
def test_float_indexed_mask_is_refused(make_model):
    """A float mask holding document ids used to be read as a padding mask (documents attending across)."""
    model = make_model("llama", "sdpa")
    mask = torch.tensor([[1.0, 1.0, 2.0, 2.0, 2.0, 0.0]])
    with configure_packing("sdpa"), pytest.raises(ValueError, match=r"float32 and values other than 0 and 1"):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=mask, use_cache=False)
    with configure_packing("sdpa"):  # a float 0/1 padding mask keeps transformers' meaning
        model(
            input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=(mask > 0).float(), use_cache=False
        )


@pytest.mark.parametrize(
    ("mask", "words"),
    [
        (
            torch.tensor([[1, 1, 2, 2, 0]]),
            r"attention_mask of shape \(1, 5\) does not match the input of shape \(1, 6\)",
        ),
        (torch.tensor([[[1, 1, 2, 2, 2, 0]]]), r"attention_mask must be a 2D"),
    ],
)
def test_mismatched_masks_are_refused(make_model, mask, words):
    model = make_model("llama", "sdpa")
    with configure_packing("sdpa"), pytest.raises(ValueError, match=words):
        model(input_ids=torch.ones(1, 6, dtype=torch.long), attention_mask=mask, use_cache=False)


def _te_like_backend():
    """A stand-in for am-attention's "te" backend: attention falling back to transformers' SDPA for every
    layer (what TE does for dropout in training, skipped layers and torch.compile), masks built like sdpa's."""
    import transformers
    import transformers.masking_utils as masking

    from am_packing._patch import ItemPatch, PatchSet

    sdpa = transformers.AttentionInterface._global_mapping["sdpa"]

    def te_attention(module, query, key, value, attention_mask, **kwargs):
        return sdpa(module, query, key, value, attention_mask, **kwargs)

    return PatchSet(
        [
            ItemPatch(transformers.AttentionInterface._global_mapping, "te", te_attention),
            ItemPatch(masking.AttentionMaskInterface._global_mapping, "te", masking.sdpa_mask),
        ]
    )


@pytest.mark.parametrize("compiled", [False, True])
def test_te_fallback_layers_get_an_exact_mask(make_model, exact, compiled):
    """configure_packing("te"): a layer that falls back to SDPA used to get the raw int64 [B, S] mask and
    crash (TorchRuntimeError under torch.compile); it now gets the block-diagonal 4D mask."""
    model = make_model("llama", "sdpa")
    docs = exact.documents()
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = pack_sequences(docs, 32)
    with _te_like_backend(), configure_packing("te"), torch.no_grad():
        model.config._attn_implementation = "te"
        try:
            run = torch.compile(model, backend="eager") if compiled else model
            logits = run(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            ).logits
        finally:
            model.config._attn_implementation = "sdpa"
            torch._dynamo.reset()
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


def test_te_without_a_mask_entry_is_refused(make_model):
    """Without "te" in AttentionMaskInterface transformers would build no mask at all: refused, not leaked."""
    import transformers

    from am_packing._patch import ItemPatch, PatchSet

    model = make_model("llama", "sdpa")
    sdpa = transformers.AttentionInterface._global_mapping["sdpa"]
    batch = pack_sequences([[5, 6, 7], [8, 9]], 6)
    te_only_attention = PatchSet([ItemPatch(transformers.AttentionInterface._global_mapping, "te", sdpa)])
    with te_only_attention, configure_packing("te"):
        model.config._attn_implementation = "te"
        try:
            with pytest.raises(ValueError, match="has no AttentionMaskInterface entry"):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            model.config._attn_implementation = "sdpa"


def test_collator_mask_through_configure_packing(make_model, exact):
    """The marked collator mask works under the process-wide configure_packing too."""
    from am_packing import PackingCollator

    model = make_model("mistral", "sdpa")
    docs = exact.documents()
    ref_logits, _ = exact.per_document(model, docs, with_grad=False)
    batch = PackingCollator(32)(docs)
    with configure_packing("sdpa"), torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


def test_configure_rejects_non_string_backends():
    with pytest.raises(TypeError, match="attn_implementation must be a str"):
        configure_packing(None)
