"""Shared fixtures: tiny models from configs, and a guard that fails any test leaking a patch or flag."""

from __future__ import annotations

import sys

import pytest
import torch

import am_precision
from am_precision import te_lazy


@pytest.fixture(autouse=True)
def _no_leaks():
    torch.manual_seed(0)
    yield
    leaked = te_lazy._default_patcher.applied
    first, optim = am_precision.get_is_first_microbatch(), am_precision.get_is_optim_step()
    # Clean up before failing, so one leak does not cascade into every later test.
    te_lazy.unpatch_te_modules()
    am_precision.set_is_first_microbatch(None)
    am_precision.set_is_optim_step(False)
    assert not leaked, "test left the TE module patches applied"
    assert first is None and optim is False, "test left the microbatch/optim-step flags set"


def _tiny_llama_config(**kw):
    from transformers import LlamaConfig

    base = dict(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    base.update(kw)
    return LlamaConfig(**base)


def _tiny_t5_config():
    from transformers import T5Config

    return T5Config(
        vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4, decoder_start_token_id=0
    )


# Small values for the fields of MoE / MLA configs; only those the config class has are set.
_SMALL_MOE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    num_attention_heads=4,
    num_key_value_heads=4,
    kv_lora_rank=16,
    q_lora_rank=32,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    qk_head_dim=16,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    index_topk=16,  # >= the 12 probe tokens: the sparse indexer keeps every key, so bf16 noise cannot flip a selection
    index_head_dim=16,
    index_n_heads=2,
    first_k_dense_replace=1,
    max_position_embeddings=64,
    o_groups=2,
    o_lora_rank=16,
    hc_mult=2,
    sliding_window=8,
    num_nextn_predict_layers=0,
)
_PER_TYPE = {"glm_moe_dsa": dict(head_dim=8), "deepseek_v4": dict(num_key_value_heads=1, head_dim=32)}


def _tiny_causal_lm(model_type: str, layers: int = 2):
    """A 2-layer random causal LM of `model_type` from its default config shrunk; skips when absent."""
    import transformers

    if model_type not in transformers.models.auto.configuration_auto.CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type!r}")
    config = transformers.AutoConfig.for_model(model_type)
    for key, value in {**_SMALL_MOE, **_PER_TYPE.get(model_type, {}), "num_hidden_layers": layers}.items():
        if hasattr(config, key):
            setattr(config, key, value)
    for key in ("layer_types", "indexer_types", "mlp_layer_types"):
        value = getattr(config, key, None)
        if isinstance(value, list):  # keep the first and the last kind (dense then MoE)
            setattr(config, key, value[: layers - 1] + value[-1:])
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture
def tiny_causal_lm():
    """`build(model_type)`: a tiny random causal LM of a transformers model type (skips when absent)."""
    return _tiny_causal_lm


@pytest.fixture
def tiny_llama():
    """`build(**config_overrides)`: the tiny Llama of `_tiny_llama_config`, seeded, in training mode."""
    from transformers import LlamaForCausalLM

    def build(**kw):
        torch.manual_seed(0)
        return LlamaForCausalLM(_tiny_llama_config(**kw))

    return build


@pytest.fixture
def keep_llama():
    """A tiny Llama whose class declares `_keep_in_fp32_modules` (no tiny stock model in every version does)."""
    from transformers import LlamaForCausalLM

    class KeepLlama(LlamaForCausalLM):
        _keep_in_fp32_modules = ["norm"]  # noqa: RUF012
        _keep_in_fp32_modules_strict = ["input_layernorm", "mlp.gate_proj"]  # noqa: RUF012

    return lambda: KeepLlama(_tiny_llama_config())


@pytest.fixture
def tiny_t5():
    """A tiny T5, which itself declares `_keep_in_fp32_modules = ["wo"]`."""
    from transformers import T5ForConditionalGeneration

    return lambda: T5ForConditionalGeneration(_tiny_t5_config())


@pytest.fixture
def fake_te(monkeypatch):
    """A FAKE transformer_engine (not the real library): tiny torch stand-ins with TE's public signatures.

    It exists only to test our own logic on CPU (dispatch, patch protocol, flag injection, recipe mapping);
    it says nothing about TE's kernels, which tests/gpu/test_precision.py exercises with the real library.
    """
    import contextlib
    import types

    from torch import nn

    calls: dict[str, list] = {"linear": [], "grouped": [], "autocast": []}

    class Linear(nn.Module):
        def __init__(self, in_features, out_features, bias=True, *, params_dtype=None, device="cuda"):
            super().__init__()
            self.in_features, self.out_features = in_features, out_features
            self.weight = nn.Parameter(
                torch.randn(out_features, in_features, dtype=params_dtype, device=device)
            )
            self.bias = (
                nn.Parameter(torch.zeros(out_features, dtype=params_dtype, device=device)) if bias else None
            )

        def forward(self, inp, is_first_microbatch=None, fp8_output=False, fp8_grad=False):
            calls["linear"].append(is_first_microbatch)
            return nn.functional.linear(inp, self.weight, self.bias)

    class GroupedLinear(nn.Module):
        def forward(self, inp, m_splits, is_first_microbatch=None):
            calls["grouped"].append(is_first_microbatch)
            return inp

    class _NormBase(nn.Module):
        def forward(self, inp):
            return inp * torch.rsqrt(inp.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight

    class RMSNorm(_NormBase):  # forward is inherited, as in some TE releases
        def __init__(self, normalized_shape, eps=1e-5, *, params_dtype=None, device="cuda"):
            super().__init__()
            self.eps = eps
            self.weight = nn.Parameter(torch.ones(normalized_shape, dtype=params_dtype, device=device))

    @contextlib.contextmanager
    def autocast(enabled=True, calibrating=False, recipe=None, amax_reduction_group=None):
        calls["autocast"].append((enabled, recipe))
        yield

    class _Recipe:
        def __repr__(self):
            return type(self).__name__

    recipe_mod = types.ModuleType("transformer_engine.common.recipe")
    for name in ("Float8CurrentScaling", "Float8BlockScaling", "MXFP8BlockScaling", "DelayedScaling"):
        setattr(recipe_mod, name, type(name, (_Recipe,), {}))
    pt = types.ModuleType("transformer_engine.pytorch")
    pt.Linear, pt.GroupedLinear, pt.RMSNorm, pt.autocast = Linear, GroupedLinear, RMSNorm, autocast
    root = types.ModuleType("transformer_engine")
    root.__version__ = "0.0-fake"
    common = types.ModuleType("transformer_engine.common")
    root.pytorch, root.common, common.recipe = pt, common, recipe_mod
    for name, mod in {
        "transformer_engine": root,
        "transformer_engine.pytorch": pt,
        "transformer_engine.common": common,
        "transformer_engine.common.recipe": recipe_mod,
    }.items():
        monkeypatch.setitem(sys.modules, name, mod)
    import am_precision.availability as availability
    from am_precision import _contract

    monkeypatch.setattr(availability, "HAVE_TE", True)
    real_version = _contract.library_version
    # The fake has no distribution metadata: contract errors report its __version__ instead.
    monkeypatch.setattr(
        _contract,
        "library_version",
        lambda library="transformers": (
            root.__version__ if library == "transformer_engine" else real_version(library)
        ),
    )
    return types.SimpleNamespace(te=pt, recipes=recipe_mod, calls=calls)
