"""Shared fixtures: tiny models from configs, and a guard that fails any test leaking a patch or flag."""

from __future__ import annotations

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


@pytest.fixture
def keep_llama():
    """A tiny Llama whose class declares `_keep_in_fp32_modules` (no tiny stock model in every version does)."""
    from transformers import LlamaForCausalLM

    class KeepLlama(LlamaForCausalLM):
        _keep_in_fp32_modules = ["norm"]
        _keep_in_fp32_modules_strict = ["input_layernorm", "mlp.gate_proj"]

    return lambda: KeepLlama(_tiny_llama_config())


@pytest.fixture
def tiny_t5():
    """A tiny T5, which itself declares `_keep_in_fp32_modules = ["wo"]`."""
    from transformers import T5ForConditionalGeneration

    return lambda: T5ForConditionalGeneration(_tiny_t5_config())
