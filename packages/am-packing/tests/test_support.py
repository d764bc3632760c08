"""check_packing_support: every refusal cause refused by both entry points with its reason, before a wrong
result; the widened families (RoBERTa-style positions, gemma3 vision-language wrapper) exact."""

from __future__ import annotations

import re

import pytest
import torch

from am_packing import (
    PackingSupport,
    check_packing_support,
    configure_packing,
    enable_packing,
    pack_sequences,
    patches,
)

SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
DOCS = ([5, 9, 17, 33, 2, 8, 40], [11, 12, 13, 14, 15], [70, 71, 72, 73, 74, 75, 76, 77, 78])


def _llama_with_conv():
    import transformers as tf

    model = tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL, num_key_value_heads=2))
    # a short convolution over the sequence, as SSM / linear-attention mixers carry
    model.model.layers[0].short_conv = torch.nn.Conv1d(32, 32, 3, groups=32, padding=2)
    return model


def _model(name: str):
    import transformers as tf

    if name == "linear_attention":
        config = tf.Qwen3NextConfig(
            **SMALL, num_key_value_heads=2, head_dim=8, layer_types=["linear_attention", "full_attention"],
            linear_num_value_heads=2, linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8,
            num_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, shared_expert_intermediate_size=16,
        )  # fmt: skip
        return tf.Qwen3NextForCausalLM(config)
    if name == "conv":
        return _llama_with_conv()
    if name == "chunked":
        config = tf.Llama4TextConfig(
            **SMALL, num_key_value_heads=2, head_dim=8, attention_chunk_size=4, num_local_experts=2,
            intermediate_size_mlp=64,
        )  # fmt: skip
        return tf.Llama4ForCausalLM(config)
    if name == "own_masks":
        return tf.OpenAIGPTLMHeadModel(tf.OpenAIGPTConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4))
    if name == "absolute_positions":
        config = tf.BartConfig(
            vocab_size=128, d_model=32, decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64,
            encoder_layers=1, encoder_attention_heads=4, encoder_ffn_dim=64, max_position_embeddings=64,
        )  # fmt: skip
        return tf.BartForCausalLM(config)
    if name == "measured":
        return tf.BloomForCausalLM(tf.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4))
    raise ValueError(name)


CAUSES = {
    "linear_attention": r"layer_types has \['linear_attention'\] layers",
    "conv": r"layers\.0\.short_conv is a Conv1d over the sequence",
    "chunked": r"chunked attention \(attention_chunk_size=4\)",
    "own_masks": r"builds attention masks itself",
    "absolute_positions": r"takes no position_ids and \S*embed_positions is an absolute position",
    "measured": r"ALiBi bias is built from attention_mask\.cumsum",
}


@pytest.mark.parametrize("cause", sorted(CAUSES))
def test_each_cause_is_refused_by_both_entry_points(cause):
    model = _model(cause).eval()
    backend = "eager"
    model.config._attn_implementation = backend
    verdict = check_packing_support(model, backend)
    assert not verdict and verdict.reason is not None and verdict.backend == backend
    assert re.search(CAUSES[cause], verdict.reason), verdict.reason
    with pytest.raises(ValueError, match=CAUSES[cause]):
        enable_packing(model, backend)
    assert model.config._attn_implementation == backend  # refused before anything changed
    batch = pack_sequences(list(DOCS), 24)
    with (
        configure_packing(backend),
        pytest.raises(ValueError, match="configure_packing cannot pack .*" + CAUSES[cause]),
    ):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)


def test_supported_model_says_so(make_model):
    model = make_model("llama", "sdpa")
    assert check_packing_support(model) == PackingSupport(True, None, "sdpa", 0)
    assert check_packing_support(model, "eager").backend == "eager"
    with pytest.raises(TypeError, match="model must be"):
        check_packing_support(torch.nn.Linear(2, 2))


def test_configure_packing_checks_each_model_once(make_model, monkeypatch):
    """The guard decides once per model instance (not per call) and leaves the global hooks as it found them."""
    from torch.nn.modules import module as nn_module

    calls = []
    real = patches.check_packing_support
    monkeypatch.setattr(patches, "check_packing_support", lambda m, *a: calls.append(m) or real(m, *a))
    model = make_model("llama", "sdpa")
    batch = pack_sequences(list(DOCS), 24)
    before = dict(nn_module._global_forward_hooks)
    with configure_packing("sdpa"), torch.no_grad():
        for _ in range(3):
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    assert sorted(type(m).__name__ for m in calls) == ["LlamaForCausalLM", "LlamaModel"]
    assert dict(nn_module._global_forward_hooks) == before


def _documents_alone(model, docs):
    with torch.no_grad():
        return [model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs]


def _worst(batch, logits, alone):
    mask = batch["attention_mask"][0]
    return max((logits[0, mask == i + 1] - ref).abs().max().item() for i, ref in enumerate(alone))


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_roberta_positions_are_offset_per_document(backend):
    """RoBERTa counts positions from padding_idx + 1: enable_packing shifts the per-document positions."""
    import transformers as tf

    config = tf.RobertaConfig(
        **SMALL, max_position_embeddings=40, is_decoder=True, pad_token_id=1, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    model = tf.RobertaForCausalLM(config).eval()
    model.set_attn_implementation(backend)
    assert check_packing_support(model).position_offset == 2
    alone = _documents_alone(model, DOCS)
    batch = pack_sequences(list(DOCS), 24)
    with enable_packing(model, backend), torch.no_grad():
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}).logits
    assert _worst(batch, logits, alone) < 1e-5
    with configure_packing(backend), pytest.raises(ValueError, match=r"count from padding_idx \+ 1 = 2"):
        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])


def _gemma3_vlm():
    import transformers as tf

    text = dict(
        **SMALL, num_key_value_heads=2, head_dim=8, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
    )  # fmt: skip
    vision = dict(
        hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=7,
    )  # fmt: skip
    config = tf.Gemma3Config(
        text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=127
    )
    return tf.Gemma3ForConditionalGeneration(config).eval()


@pytest.mark.parametrize("entry", ["enable_packing", "configure_packing"])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_gemma3_vision_language_wrapper_is_exact(entry, backend):
    """The wrapper's mask path (create_masks_for_generate) reaches the document mask under both entry points."""
    torch.manual_seed(0)
    model = _gemma3_vlm()
    model.set_attn_implementation(backend)
    alone = _documents_alone(model, DOCS)
    batch = pack_sequences(list(DOCS), 24)
    handle = enable_packing(model, backend) if entry == "enable_packing" else configure_packing(backend)
    with handle, torch.no_grad():
        logits = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}, use_cache=False
        ).logits
    assert _worst(batch, logits, alone) < 1e-5
    assert model.config.get_text_config()._attn_implementation == backend
