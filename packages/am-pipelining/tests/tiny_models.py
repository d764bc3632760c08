"""Tiny HF models built from configs (no downloads) shared by the tests and the dist worker."""

from __future__ import annotations

import importlib.util

import torch

VOCAB = 128
IMAGE_TOKEN = 10


def has_gemma4() -> bool:
    return importlib.util.find_spec("transformers.models.gemma4") is not None


def _common(**extra):
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    base.update(extra)
    return base


def build(name: str, *, seed: int = 0, layers: int = 4) -> torch.nn.Module:
    """A tiny fp32 model of architecture `name` with deterministic weights."""
    import transformers as tf

    torch.manual_seed(seed)
    if name == "llama":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**_common(num_hidden_layers=layers)))
    elif name == "qwen3":
        model = tf.Qwen3ForCausalLM(tf.Qwen3Config(**_common(num_hidden_layers=layers)))
    elif name == "qwen2_sliding":
        cfg = tf.Qwen2Config(
            **_common(num_hidden_layers=layers),
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=2,
        )
        model = tf.Qwen2ForCausalLM(cfg)
    elif name == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**_common(num_hidden_layers=layers), sliding_window=4))
    elif name == "gemma3":
        cfg = tf.Gemma3TextConfig(
            **_common(num_hidden_layers=layers),
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"] * (layers // 2),
            final_logit_softcapping=30.0,
        )
        model = tf.Gemma3ForCausalLM(cfg)
    elif name == "gemma4":
        model = tf.Gemma4ForCausalLM(_gemma4_text_config(layers))
    elif name == "gemma4_vlm":
        cfg = tf.Gemma4Config(
            text_config=_gemma4_text_config(layers).to_dict(),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                head_dim=16,
                patch_size=4,
            ),
            image_token_id=IMAGE_TOKEN,
            boi_token_id=11,
            eoi_token_id=12,
            video_token_id=13,
            audio_token_id=14,
            tie_word_embeddings=False,
        )
        model = tf.Gemma4ForConditionalGeneration(cfg)
    elif name == "mistral3":
        cfg = tf.Mistral3Config(
            text_config=dict(model_type="mistral", **_common(num_hidden_layers=layers), sliding_window=None),
            vision_config=dict(
                model_type="pixtral",
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                head_dim=16,
                image_size=32,
                patch_size=8,
            ),
            image_token_index=IMAGE_TOKEN,
            spatial_merge_size=2,
            tie_word_embeddings=False,
        )
        cfg.image_token_id = IMAGE_TOKEN
        model = tf.Mistral3ForConditionalGeneration(cfg)
    elif name == "qwen2_vl":
        # mrope: head_dim 8 -> 4 rotary frequencies split over temporal/height/width rows.
        text = _common(
            num_hidden_layers=layers, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]}
        )
        text.pop("head_dim")
        cfg = tf.Qwen2VLConfig(
            text_config=text,
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4),
            image_token_id=VOCAB - 3,
            video_token_id=VOCAB - 4,
            vision_start_token_id=VOCAB - 5,
            vision_end_token_id=VOCAB - 6,
            tie_word_embeddings=False,
        )
        model = tf.Qwen2VLForConditionalGeneration(cfg)
    else:
        raise ValueError(name)
    return model.eval()


def _gemma4_text_config(layers: int):
    import transformers as tf

    return tf.Gemma4TextConfig(
        **_common(num_hidden_layers=layers),
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * (layers // 2),
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        global_head_dim=8,
        final_logit_softcapping=30.0,
    )


def mistral3_inputs(batch: int = 2, seq: int = 12):
    """input_ids with 4 image tokens per row, one 32x32 image per row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, VOCAB, (batch, seq), generator=g)
    ids[:, 2:6] = IMAGE_TOKEN
    pixel_values = torch.randn(batch, 3, 32, 32, generator=g)
    image_sizes = torch.tensor([[32, 32]] * batch)
    return ids, pixel_values, image_sizes
