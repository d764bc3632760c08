"""torch.compile of Liger-patched decoder layers (per layer, as FSDP recipes do): compiled == eager, bounded recompiles.

The rope patch runs a copy of the attention forward with its own globals. torch.compile caches compiled frames per
code object and installs what it compiled into the frame's globals, so the copy has to keep both consistent across
the layers that share it. On a GPU, Liger's Triton rope makes dynamo break the graph inside the attention forward;
the torch ops here do the same with an explicit graph break, so that path runs on CPU too.
"""

import dataclasses

import pytest
import torch

from am_kernels import patch_liger_kernel, unpatch_liger_kernel

IDS = (torch.arange(32).reshape(2, 16) * 3) % 128
torch_dynamo = pytest.importorskip("torch._dynamo")
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402


def _run(model, ref, counter):
    for layer in model.model.layers:
        layer.compile(backend=counter)
    try:
        with torch.no_grad():
            for _ in range(2):
                torch.testing.assert_close(
                    model(IDS, use_cache=False).logits, ref(IDS, use_cache=False).logits, rtol=1e-5, atol=1e-5
                )
        model.train(), ref.train()
        for _ in range(2):
            model.zero_grad(), ref.zero_grad()
            out, expected = model(IDS, labels=IDS, use_cache=False), ref(IDS, labels=IDS, use_cache=False)
            torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
            out.loss.backward()
            expected.loss.backward()
            for (name, p), q in zip(model.named_parameters(), ref.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    finally:
        for layer in model.model.layers:
            layer._compiled_call_impl = None


@pytest.mark.parametrize("graph_break", [False, True], ids=["traced-rope", "graph-break-in-rope"])
def test_compiled_liger_layers_match_eager_with_recompiles_independent_of_depth(tiny, torch_ops, graph_break):
    def rope(*args):
        if graph_break:
            torch._dynamo.graph_break()
        return torch_ops.rotary_pos_emb(*args)

    ops = dataclasses.replace(torch_ops, rotary_pos_emb=rope)
    frames = {}
    for layers in (2, 4):
        torch._dynamo.reset()
        ref, model = tiny("llama", num_hidden_layers=layers), tiny("llama", num_hidden_layers=layers)
        patch_liger_kernel(model, ops=ops)
        counter = CompileCounterWithBackend("aot_eager")
        try:
            _run(model, ref, counter)
        finally:
            unpatch_liger_kernel(model)
        frames[layers] = counter.frame_count
    # Every layer reuses the frames compiled for the first one: no recompile per layer.
    assert frames[2] == frames[4] > 0, frames
    if not graph_break:
        torch._dynamo.reset()
        plain, ref = tiny("llama"), tiny("llama")
        counter = CompileCounterWithBackend("aot_eager")
        _run(plain, ref, counter)
        assert frames[2] == counter.frame_count  # no more frames than transformers' own layers
    torch._dynamo.reset()
