"""Built-in tiny architectures, constructed from configs in code (nothing is downloaded).

Each entry builds a randomly initialised model small enough for a CPU: hidden 64, 4 layers,
vocab 256. Sliding windows are smaller than the probe sequences so that they matter.

This module is the one place where am-cli and the repository's root tests (integration, contracts,
minors, gpu) get their models: `build_config(name, **overrides)` changes sizes (for a VLM, of its text
model) while keeping each architecture's layout (Gemma's alternating layer types follow the layer count).
"""

from __future__ import annotations

import importlib.util
import json
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


def _alternating(kwargs: dict[str, Any]) -> list[str]:
    """Gemma's layout: sliding then full attention, repeated over the layer count."""
    layers = kwargs["num_hidden_layers"]
    return [("sliding_attention", "full_attention")[i % 2] for i in range(layers)]


def _llama(**overrides: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**_text_kwargs(**overrides))


def _qwen2(**overrides: Any) -> Any:
    from transformers import Qwen2Config

    return Qwen2Config(**_text_kwargs(use_sliding_window=False, **overrides))


def _qwen3(**overrides: Any) -> Any:
    from transformers import Qwen3Config

    return Qwen3Config(**_text_kwargs(**overrides))


def _mistral(**overrides: Any) -> Any:
    from transformers import MistralConfig

    return MistralConfig(**_text_kwargs(**{"sliding_window": SLIDING_WINDOW, **overrides}))


def _gemma3(**overrides: Any) -> Any:
    from transformers import Gemma3TextConfig

    kwargs = _text_kwargs(
        **{
            "sliding_window": SLIDING_WINDOW,
            "query_pre_attn_scalar": 24,  # scaling != 1/sqrt(head_dim)
            **overrides,
        }
    )
    kwargs.setdefault("layer_types", _alternating(kwargs))
    return Gemma3TextConfig(**kwargs)


def _gemma4(**overrides: Any) -> Any:
    from transformers import Gemma4TextConfig

    kwargs = _text_kwargs(
        **{
            "sliding_window": SLIDING_WINDOW,
            "hidden_size_per_layer_input": 16,
            "vocab_size_per_layer_input": overrides.get("vocab_size", VOCAB),
            "num_kv_shared_layers": 0,
            **overrides,
        }
    )
    kwargs.setdefault("layer_types", _alternating(kwargs))
    return Gemma4TextConfig(**kwargs)


def _qwen2_vl(**overrides: Any) -> Any:
    from transformers import Qwen2VLConfig

    text = _text_kwargs(
        **{"rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]}, **overrides}
    )
    text.pop("head_dim", None)
    vocab = text["vocab_size"]
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
        image_token_id=vocab - 3,
        video_token_id=vocab - 4,
        vision_start_token_id=vocab - 5,
        vision_end_token_id=vocab - 6,
        tie_word_embeddings=False,
    )


def _mistral3(**overrides: Any) -> Any:
    from transformers import Mistral3Config

    text = _text_kwargs(**{"sliding_window": None, **overrides})
    return Mistral3Config(
        text_config=dict(model_type="mistral", **text),
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
        image_token_index=text["vocab_size"] - 3,
        spatial_merge_size=2,
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )


@dataclass(frozen=True)
class TinyArch:
    name: str
    build_config: Callable[..., Any]
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


def build_config(name: str, **overrides: Any) -> Any:
    """The config of built-in architecture `name`; `overrides` replace text-model fields (sizes, windows,
    `attn_implementation`, ...), and the derived ones (Gemma's layer types, VLM special token ids) follow."""
    if not isinstance(name, str) or name not in TINY_ARCHS:
        raise ValueError(f"unknown built-in model {name!r}; expected one of {sorted(TINY_ARCHS)}")
    arch = TINY_ARCHS[name]
    if not arch.available():
        import transformers

        raise ValueError(
            f"built-in model {name!r} needs transformers.models.{arch.requires}, "
            f"which transformers {transformers.__version__} does not have"
        )
    return arch.build_config(**overrides)


def build_model(config: Any, *, attn_implementation: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    """A randomly initialised causal LM (or VLM for conditional generation) for `config`, fp32, train mode."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if hasattr(config, "vision_config") else AutoModelForCausalLM
    model = auto.from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.train()


# Structural fields that must be positive ints wherever a config (or its text_config) has them.
_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


def _check_fields(values: dict[str, Any], where: str) -> None:
    for key in _POSITIVE_INT_FIELDS:
        value = values.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{where}: {key} must be a positive integer, got {value!r}")
    model_type = values.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ValueError(f"{where}: model_type must be a string, got {model_type!r}")


def _causal_lm_problem(config: Any) -> str | None:
    """Why `build_model` cannot build `config` (not a causal LM / image-text-to-text model), or None."""
    from transformers.models.auto import modeling_auto

    if hasattr(config, "vision_config"):
        names, kind = modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "image-text-to-text"
    else:
        names, kind = modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, "causal LM"
    model_type = getattr(config, "model_type", None)
    if model_type not in names:
        return (
            f"model_type {model_type!r} ({type(config).__name__}) has no {kind} class in transformers; "
            "am doctor checks causal LMs and image-text-to-text models"
        )
    return None


def load_local_config(path: str | Path) -> Any:
    """The config of a local model directory (its config.json) or of a named JSON file.

    Weights are not needed and never loaded. ValueError (one line) for a missing path, a file that is not
    a JSON object, structural fields that are not positive integers, or a model type that is not a
    causal LM (or image-text-to-text model).
    """
    from transformers import AutoConfig

    target = Path(path)
    if not target.exists():
        raise ValueError(f"model path {str(target)!r} does not exist")
    config_file = target / "config.json" if target.is_dir() else target
    if not config_file.is_file():
        raise ValueError(f"no config.json in {str(target)!r}")
    try:
        values = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read the config in {str(config_file)!r}: {_first_line(exc)}") from exc
    if not isinstance(values, dict):
        raise ValueError(f"cannot read the config in {str(config_file)!r}: expected a JSON object")
    _check_fields(values, str(config_file))
    for key, sub in values.items():
        if key.endswith("text_config") and isinstance(sub, dict):
            _check_fields(sub, f"{config_file}: {key}")
    try:
        # A file path loads that very file (a directory would load its config.json instead).
        config = AutoConfig.from_pretrained(str(config_file), local_files_only=True)
    except Exception as exc:  # whatever transformers raises about the user's file, said in one line
        raise ValueError(f"cannot read the config in {str(config_file)!r}: {_first_line(exc)}") from exc
    problem = _causal_lm_problem(config)
    if problem:
        raise ValueError(f"{config_file}: {problem}")
    return config


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
