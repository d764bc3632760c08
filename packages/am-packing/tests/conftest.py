"""Shared fixtures: tiny models from configs, a leak detector for every patch we make."""

from __future__ import annotations

import sys

import pytest
import torch

torch.set_num_threads(1)

BUILDERS = ("create_causal_mask", "create_sliding_window_causal_mask")


def _snapshot() -> dict:
    import transformers
    import transformers.masking_utils as masking
    import transformers.modeling_flash_attention_utils as flash_utils

    snap = {
        "masking": {name: vars(masking)[name] for name in BUILDERS},
        "unpad": vars(flash_utils)["_get_unpad_data"],
        "attn": dict(transformers.AttentionInterface._global_mapping),
        "mask_iface": dict(masking.AttentionMaskInterface._global_mapping),
    }
    snap["modules"] = {
        (name, b): vars(mod).get(b)
        for name, mod in list(sys.modules.items())
        if name.startswith("transformers.models.") and mod is not None
        for b in BUILDERS
        if b in vars(mod)
    }
    return snap


@pytest.fixture(autouse=True)
def no_patch_leak():
    """Fail any test that leaves one of our patches (or a registry entry) behind."""
    from am_packing import backends, patches
    from am_packing._patch import patch_name

    before = _snapshot()
    yield
    after = _snapshot()
    leaked = []
    for key in ("masking", "attn", "mask_iface"):
        for name, value in after[key].items():
            if before[key].get(name) is not value:
                leaked.append(f"{key}[{name}]")
    if after["unpad"] is not before["unpad"]:
        leaked.append("_get_unpad_data")
    for (name, b), value in after["modules"].items():
        if patch_name(value) is not None:
            leaked.append(f"{name}.{b}")
    assert not leaked, f"test leaked patches: {leaked}"
    assert patches._ACTIVE is None and backends._VARLEN_SET is None


@pytest.fixture
def eager_flex(monkeypatch):
    """Run flex_attention uncompiled (torch's eager reference path): same op, no inductor build on CPU."""
    import transformers.integrations.flex_attention as fa
    from torch.nn.attention.flex_attention import flex_attention

    def run(query, key, value, training=False, **kwargs):
        return flex_attention(query, key, value, **kwargs)

    monkeypatch.setattr(fa, "compile_friendly_flex_attention", run)


COMMON = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attention_dropout=0.0,
)


def tiny_config(arch: str):
    """Tiny configs; Mistral/Qwen2/Gemma3 windows (8) are shorter than the test documents (up to 20)."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**COMMON)
    if arch == "qwen2":
        return tf.Qwen2Config(**COMMON, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if arch == "qwen3":
        return tf.Qwen3Config(**COMMON, head_dim=8)
    if arch == "mistral":
        return tf.MistralConfig(**COMMON, sliding_window=8)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(
            **COMMON, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        )
    raise ValueError(arch)


@pytest.fixture
def make_model():
    from transformers import AutoModelForCausalLM

    def build(arch: str, attn_implementation: str = "eager", seed: int = 0):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(
            tiny_config(arch), attn_implementation=attn_implementation, dtype=torch.float32
        )
        return model.eval()

    return build
