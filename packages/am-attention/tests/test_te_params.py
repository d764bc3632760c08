from __future__ import annotations

import sys

import pytest
import torch

from am_attention import infer_attn_params, proj_out_features

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import build


class Wrapped(torch.nn.Module):
    """Like Gemma4ClippableLinear: the Linear is a `.linear` child."""

    def __init__(self, i, o):
        super().__init__()
        self.linear = torch.nn.Linear(i, o)


def test_proj_out_features_layouts():
    assert proj_out_features(torch.nn.Linear(8, 12)) == 12
    with torch.device("meta"):
        meta = torch.nn.Linear(8, 20)
    assert proj_out_features(meta) == 20
    weight_only = torch.nn.Module()
    weight_only.weight = torch.nn.Parameter(torch.empty(7, 3))
    assert proj_out_features(weight_only) == 7
    assert proj_out_features(Wrapped(8, 24)) == 24
    assert proj_out_features(None) is None
    assert proj_out_features(torch.nn.ReLU()) is None


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_params_from_hf_modules_match_config(arch):
    model = build(arch)
    attn = model.model.layers[0].self_attn
    p = infer_attn_params(attn)
    cfg = model.config
    assert (p.num_heads, p.num_kv_heads, p.head_dim) == (
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.hidden_size // cfg.num_attention_heads,
    )
    assert p.softmax_scale == pytest.approx(attn.scaling)
    expected_window = (cfg.sliding_window - 1, 0) if arch == "mistral" else (-1, 0)
    assert p.window_size == expected_window


def test_heads_from_projection_shapes_on_meta_with_wrapped_linears():
    class ConfigOnlyAttention(torch.nn.Module):  # head count only in config (Gemma4-style)
        def __init__(self):
            super().__init__()
            self.config = type("C", (), {"num_attention_heads": 6, "head_dim": 8})()
            self.head_dim = 8
            self.q_proj = Wrapped(32, 48)
            self.k_proj = Wrapped(32, 16)
            self.v_proj = Wrapped(32, 16)
            self.sliding_window = 10

    with torch.device("meta"):
        module = ConfigOnlyAttention()
    p = infer_attn_params(module)
    assert (p.num_heads, p.num_kv_heads, p.head_dim, p.window_size) == (6, 2, 8, (9, 0))
    assert p.softmax_scale == pytest.approx(8**-0.5)


def test_unfit_layouts_return_none():
    fused = torch.nn.Module()
    fused.qkv = torch.nn.Linear(8, 24)
    assert infer_attn_params(fused) is None
    bad = build("llama").model.layers[0].self_attn
    bad.v_proj = torch.nn.Linear(64, 8)
    assert infer_attn_params(bad) is None
