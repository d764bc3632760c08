"""torch.compile: compiled numbers equal eager ones on every path, the kernel runs, and nothing recompiles.

Under compile transformers always builds a 4D mask (it cannot skip it while tracing), and with a cache it
skips its packed-sequence detection, so a packed batch given by `position_ids` reaches the attention with a
plain causal mask: the path that used to attend across documents when compiled and recompile on every call.
"""

from __future__ import annotations

import sys

import pytest
import torch
from torch._dynamo.utils import counters

import am_attention as A

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import build

REF = A.ReferenceDotProductAttention
LENGTHS = (5, 8, 3)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _packed_positions():
    return torch.stack([torch.cat([torch.arange(n) for n in LENGTHS]), torch.arange(16)])


def _causal(s=16):
    return torch.ones(1, 1, s, s, dtype=torch.bool).tril()


def _compiled_calls(fn, args, calls=3, backend="eager"):
    """Outputs of `calls` calls of `fn` compiled; the second and later calls must not recompile."""
    compiled = torch.compile(fn, backend=backend)
    outs = [compiled(*args)]
    graphs = counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        outs += [compiled(*args) for _ in range(calls - 1)]
    assert counters["stats"]["unique_graphs"] == graphs
    return outs


@pytest.mark.parametrize("backend, mask", [("aot_eager", "none"), ("eager", "causal")])
def test_packed_position_ids_compiled_equal_eager_and_run_the_kernel(backend, mask):
    model = build("mistral")  # sliding window 6 < 16: the window is exercised too
    attn = model.model.layers[0].self_attn
    pos = _packed_positions()
    x = torch.randn(2, 16, 64, requires_grad=True)
    emb = model.model.rotary_emb(x, pos)
    attention_mask = None if mask == "none" else _causal().expand(2, 1, 16, 16)
    if mask == "causal":  # a sliding layer gets the sliding causal mask
        i = torch.arange(16)
        attention_mask = attention_mask & (i[None, :] > i[:, None] - 6)

    def run(x):
        return attn(x, emb, attention_mask, position_ids=pos)[0]

    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        eager = run(x)
        (grad_eager,) = torch.autograd.grad(eager.pow(2).sum(), x)
        A.reset_te_attention_stats()
        outs = _compiled_calls(run, (x,), backend=backend)
        (grad_compiled,) = torch.autograd.grad(outs[-1].pow(2).sum(), x)
        stats = A.get_te_attention_stats()
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    torch.testing.assert_close(grad_compiled, grad_eager, atol=1e-5, rtol=0)
    assert stats["te_thd_hits"] == 3 and stats["fallback_mask"] == 0, stats
    # and the documents are kept apart: the first document alone gives the same rows
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        alone = attn(x[:1, :5], tuple(e[:1, :5] for e in emb), None, position_ids=pos[:1, :5])[0]
    torch.testing.assert_close(outs[0][:1, :5], alone, atol=1e-5, rtol=0)


def test_indexed_mask_compiled_equal_eager():
    model = build("qwen2")
    attn = model.model.layers[0].self_attn
    indexed = torch.tensor([[1] * 5 + [2] * 8 + [0] * 3, [1] * 16])
    q, k, v = torch.randn(2, 4, 16, 16), torch.randn(2, 2, 16, 16), torch.randn(2, 2, 16, 16)

    def run(q, k, v):
        return A.te_attention_forward(attn, q, k, v, indexed, scaling=attn.scaling)[0]

    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        eager = run(q, k, v)
        outs = _compiled_calls(run, (q, k, v), backend="aot_eager")
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-6, rtol=0)
    assert eager[0, 13:].abs().max() == 0


def test_whole_model_compiled_with_cache_equals_eager():
    """The issue's repro: use_cache left on, a packed batch by position_ids, the whole model compiled."""
    model = build("qwen2", num_hidden_layers=1).eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    pos = _packed_positions()
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        eager = model(input_ids=ids, position_ids=pos).logits
        A.reset_te_attention_stats()
        outs = _compiled_calls(lambda i, p: model(input_ids=i, position_ids=p).logits, (ids, pos), calls=2)
        stats = A.get_te_attention_stats()
    for out in outs:
        torch.testing.assert_close(out, eager, atol=1e-5, rtol=0)
    assert stats["te_thd_hits"] == 2 and stats["fallback_mask"] == 0, stats
