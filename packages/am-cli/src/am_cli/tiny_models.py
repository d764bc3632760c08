"""Built-in tiny architectures, constructed from configs in code (nothing is downloaded).

Each entry builds a randomly initialised model small enough for a CPU: hidden 64, 4 layers,
vocab 256. Sliding windows are smaller than the probe sequences so that they matter.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

VOCAB = 256
HIDDEN = 64
LAYERS = 4
SLIDING_WINDOW = 8


def _text_kwargs(**overrides: Any) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return kwargs


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_text_kwargs())


def _qwen2() -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_text_kwargs(use_sliding_window=False))


def _qwen3() -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_text_kwargs())


def _mistral() -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_text_kwargs(sliding_window=SLIDING_WINDOW))


def _gemma3() -> Any:
    from transformers import Gemma3TextConfig

    return Gemma3TextConfig(
        **_text_kwargs(
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
            query_pre_attn_scalar=24,  # scaling != 1/sqrt(head_dim)
        )
    )


def _gemma4() -> Any:
    from transformers import Gemma4TextConfig

    return Gemma4TextConfig(
        **_text_kwargs(
            sliding_window=SLIDING_WINDOW,
            layer_types=["sliding_attention", "full_attention"] * (LAYERS // 2),
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=VOCAB,
            num_kv_shared_layers=0,
        )
    )


def _qwen2_vl() -> Any:
    from transformers import Qwen2VLConfig

    text = _text_kwargs(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3]})
    text.pop("head_dim")
    return Qwen2VLConfig(
        text_config=text,
        vision_config=dict(
            depth=2,
            embed_dim=32,
            hidden_size=HIDDEN,
            num_heads=2,
            patch_size=4,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
            mlp_ratio=2,
        ),
        image_token_id=VOCAB - 3,
        video_token_id=VOCAB - 4,
        vision_start_token_id=VOCAB - 5,
        vision_end_token_id=VOCAB - 6,
        tie_word_embeddings=False,
    )


def _mistral3() -> Any:
    from transformers import Mistral3Config

    return Mistral3Config(
        text_config=dict(model_type="mistral", **_text_kwargs(sliding_window=None)),
        vision_config=dict(
            model_type="pixtral",
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            head_dim=16,
            image_size=32,
            patch_size=8,
        ),
        image_token_index=VOCAB - 3,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


@dataclass(frozen=True)
class TinyArch:
    name: str
    build_config: Callable[[], Any]
    requires: str  # the transformers.models submodule that must exist
    vlm: bool = False

    def available(self) -> bool:
        return importlib.util.find_spec(f"transformers.models.{self.requires}") is not None


TINY_ARCHS: dict[str, TinyArch] = {
    a.name: a
    for a in (
        TinyArch("llama", _llama, "llama"),
        TinyArch("qwen2", _qwen2, "qwen2"),
        TinyArch("qwen3", _qwen3, "qwen3"),
        TinyArch("mistral", _mistral, "mistral"),
        TinyArch("gemma3", _gemma3, "gemma3"),
        TinyArch("gemma4", _gemma4, "gemma4"),
        TinyArch("qwen2-vl", _qwen2_vl, "qwen2_vl", vlm=True),
        TinyArch("mistral3", _mistral3, "mistral3", vlm=True),
    )
}


def available_archs() -> list[str]:
    """Built-in architectures the installed transformers can build."""
    return [name for name, arch in TINY_ARCHS.items() if arch.available()]


def build_config(name: str) -> Any:
    if name not in TINY_ARCHS:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {sorted(TINY_ARCHS)}")
    arch = TINY_ARCHS[name]
    if not arch.available():
        import transformers

        raise ValueError(
            f"built-in model {name!r} needs transformers.models.{arch.requires}, "
            f"which transformers {transformers.__version__} does not have"
        )
    return arch.build_config()


def build_model(config: Any, *, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM (or VLM for conditional generation) for `config`, fp32, train mode."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.train()


def load_local_config(path: str | Path) -> Any:
    """The config of a local model directory (weights are not needed and never loaded)."""
    from transformers import AutoConfig

    directory = Path(path)
    if not directory.exists():
        raise ValueError(f"model path {str(directory)!r} does not exist")
    config_file = directory / "config.json" if directory.is_dir() else directory
    if not config_file.is_file():
        raise ValueError(f"no config.json in {str(directory)!r}")
    try:
        return AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot read the config in {str(config_file)!r}: {first}") from exc
