from __future__ import annotations

import torch

import am_attention as A


def test_attn_implementation_te_is_a_registered_backend():
    import transformers

    handle = A.register_te_attention_backend()
    try:
        assert A.register_te_attention_backend() is handle
        cfg = transformers.LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
        model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="te")
        assert model.config._attn_implementation == "te"
        model(torch.randint(0, 64, (1, 5)))
        # nothing injected: every call ran transformers' SDPA and says so
        assert A.get_te_attention_stats()["fallback_not_injected"] == 1
    finally:
        A.unregister_te_attention_backend()
