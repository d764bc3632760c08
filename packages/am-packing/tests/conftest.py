"""Shared fixtures: tiny models from configs, a leak detector for every patch we make."""

from __future__ import annotations

import inspect
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
def no_setattr(monkeypatch):
    """Record every Patch/ItemPatch write, so drift tests can assert nothing was patched, not even briefly."""
    from am_packing._patch import ItemPatch, Patch

    writes = []
    for cls in (Patch, ItemPatch):
        original = vars(cls)["_set"]

        def spy(self, value, _original=original):
            writes.append(self.describe())
            return _original(self, value)

        monkeypatch.setattr(cls, "_set", spy)
    return writes


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


def _builder_copy(original, *, rename=None, ignore=(), move=None):
    """A stand-in for a transformers mask builder with a drifted signature, forwarding to `original`.

    `rename` maps original parameter names to the copy's, `ignore` names parameters the copy accepts but
    drops (silently, the worst drift), `move` = (name, index) re-orders one parameter. Like a real def, the
    copy raises TypeError for a name it does not declare, so a caller using the wrong spelling fails.
    """
    rename = rename or {}
    real = inspect.signature(original)
    params = [p.replace(name=rename.get(p.name, p.name)) for p in real.parameters.values()]
    if move is not None:
        name, index = move
        param = next(p for p in params if p.name == name)
        params.remove(param)
        params.insert(index, param)
    fake = real.replace(parameters=params)
    back = {new: old for old, new in rename.items()}

    def copy(*args, **kwargs):
        bound = fake.bind(*args, **kwargs)
        return original(**{back.get(k, k): v for k, v in bound.arguments.items() if k not in ignore})

    copy.__signature__ = fake
    copy.__name__ = copy.__qualname__ = original.__name__
    copy.__module__ = original.__module__
    return copy


@pytest.fixture
def builder_copy():
    return _builder_copy
