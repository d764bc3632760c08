from __future__ import annotations

import sys

import torch

import am_attention as A

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import build


def test_attention_path_compiles_fullgraph_with_reference_kernel():
    torch._dynamo.reset()
    model = build("mistral").eval()
    attn = model.model.layers[0].self_attn
    A.inject_te_attention_into_module(attn, dot_product_attention_cls=A.ReferenceDotProductAttention)
    A.register_te_attention_backend()
    try:
        q, k, v = torch.randn(1, 4, 10, 16), torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)

        def call(q, k, v):
            return A.te_attention_forward(attn, q, k, v, None, scaling=attn.scaling, sliding_window=6)[0]

        eager = call(q, k, v)
        compiled = torch.compile(call, fullgraph=True, backend="eager")(q, k, v)
        torch.testing.assert_close(compiled, eager)
        assert A.get_te_attention_stats()["te_hits"] == 2  # counters are updated from compiled code too
        mask = torch.ones(1, 1, 10, 10, dtype=torch.bool).tril()
        # a 4D mask under compile cannot be classified without a sync: it falls back, still without a break
        torch.compile(
            lambda q, k, v: A.te_attention_forward(
                attn, q, k, v, mask, scaling=attn.scaling, sliding_window=6
            )[0],
            fullgraph=True,
            backend="eager",
        )(q, k, v)
        assert A.get_te_attention_stats()["fallback_mask"] == 1
    finally:
        A.remove_te_attention(model)
        A.unregister_te_attention_backend()
        torch._dynamo.reset()


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
