"""Tiny HF causal LMs built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers

COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    attn_implementation="sdpa",
)


def build(arch: str, **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    kw = {**COMMON, **overrides}
    if arch == "llama":
        kw["num_key_value_heads"] = overrides.get("num_key_value_heads", 4)
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    elif arch == "qwen2":
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**kw))
    elif arch == "mistral":
        kw.setdefault("sliding_window", 6)
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    elif arch == "gemma3":
        kw.update(
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            num_hidden_layers=2,
        )
        model = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**kw))
    else:
        raise ValueError(arch)
    return model.float()


ARCHS = ("llama", "qwen2", "mistral", "gemma3")
