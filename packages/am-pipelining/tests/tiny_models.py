"""Tiny HF models built from configs (no downloads) shared by the tests and the dist worker.

`config(name, **overrides)` is the one place a tiny config is written; `build(name, ...)` makes the
model of that config with deterministic weights.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch

VOCAB = 128
IMAGE_TOKEN = 10


def has_gemma4() -> bool:
    return importlib.util.find_spec("transformers.models.gemma4") is not None


def _text(layers: int, **extra: Any) -> dict[str, Any]:
    base = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    base.update(extra)
    return base


def _alternating(layers: int) -> list[str]:
    return ["sliding_attention", "full_attention"] * (layers // 2)


def _gemma4_text(layers: int) -> dict[str, Any]:
    return _text(
        layers,
        sliding_window=4,
        layer_types=_alternating(layers),
        hidden_size_per_layer_input=0,
        num_kv_shared_layers=0,
        global_head_dim=8,
        final_logit_softcapping=30.0,
    )


def _qwen2_vl_text(layers: int) -> dict[str, Any]:
    # mrope: head_dim 8 -> 4 rotary frequencies split over temporal/height/width rows.
    text = _text(layers, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2]})
    text.pop("head_dim")
    return text


# name -> (config class, model class, config kwargs for `layers` decoder layers)
_ARCHS: dict[str, tuple[str, str, Any]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", _text),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _text),
    "qwen2_sliding": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        lambda n: _text(n, use_sliding_window=True, sliding_window=4, max_window_layers=2),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", lambda n: _text(n, sliding_window=4)),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        lambda n: _text(n, sliding_window=4, layer_types=_alternating(n), final_logit_softcapping=30.0),
    ),
    "gemma3_vlm": (
        "Gemma3Config",
        "Gemma3ForConditionalGeneration",
        lambda n: dict(
            text_config=_text(n, sliding_window=4, layer_types=_alternating(n)),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            mm_tokens_per_image=4,
            image_token_index=IMAGE_TOKEN,
            boi_token_index=11,
            eoi_token_index=12,
            tie_word_embeddings=False,
        ),
    ),
    "gemma4": ("Gemma4TextConfig", "Gemma4ForCausalLM", _gemma4_text),
    "gemma4_vlm": (
        "Gemma4Config",
        "Gemma4ForConditionalGeneration",
        lambda n: dict(
            text_config=_gemma4_text(n),
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
        ),
    ),
    "mistral3": (
        "Mistral3Config",
        "Mistral3ForConditionalGeneration",
        lambda n: dict(
            text_config=dict(model_type="mistral", **_text(n, sliding_window=None)),
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
        ),
    ),
    "qwen2_vl": (
        "Qwen2VLConfig",
        "Qwen2VLForConditionalGeneration",
        lambda n: dict(
            text_config=_qwen2_vl_text(n),
            vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, patch_size=4),
            image_token_id=VOCAB - 3,
            video_token_id=VOCAB - 4,
            vision_start_token_id=VOCAB - 5,
            vision_end_token_id=VOCAB - 6,
            tie_word_embeddings=False,
        ),
    ),
}


def config(name: str, *, layers: int = 4, **overrides: Any) -> Any:
    """The tiny config of architecture `name` (`overrides` replace top-level fields)."""
    import transformers as tf

    config_cls, _, kwargs = _ARCHS[name]
    cfg = getattr(tf, config_cls)(**{**kwargs(layers), **overrides})
    if name == "mistral3":
        cfg.image_token_id = IMAGE_TOKEN
    return cfg


def build(name: str, *, seed: int = 0, layers: int = 4, **overrides: Any) -> torch.nn.Module:
    """A tiny fp32 model of architecture `name` with deterministic weights (eval mode)."""
    import transformers as tf

    cfg = config(name, layers=layers, **overrides)
    torch.manual_seed(seed)
    return getattr(tf, _ARCHS[name][1])(cfg).eval()


def mistral3_inputs(batch: int = 2, seq: int = 12):
    """input_ids with 4 image tokens per row, one 32x32 image per row."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(20, VOCAB, (batch, seq), generator=g)
    ids[:, 2:6] = IMAGE_TOKEN
    pixel_values = torch.randn(batch, 3, 32, 32, generator=g)
    image_sizes = torch.tensor([[32, 32]] * batch)
    return ids, pixel_values, image_sizes
