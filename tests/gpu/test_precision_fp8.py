"""inject_te_linear with the real transformer-engine on a GPU (skipped without CUDA or TE)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import transformers

import am_precision as ap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformer_engine") is None, reason="needs transformer-engine"
    ),
]


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to("cuda", torch.bfloat16)


IDS = torch.randint(0, 512, (2, 128), generator=torch.Generator().manual_seed(1))


def test_real_te_linear_swap_fp8_step_and_state_dict():
    import transformer_engine.pytorch as te

    model, plain = _llama(), _llama()
    ids = IDS.cuda()
    ref = plain(ids, labels=ids)
    handle = ap.inject_te_linear(model)
    assert len(handle.taken) == 14 and all(
        isinstance(model.get_submodule(n), te.Linear) for n in handle.taken
    )
    out = model(ids, labels=ids)  # TE Linear outside FP8 autocast: a bf16 GEMM
    torch.testing.assert_close(out.logits, ref.logits, rtol=2**-6, atol=2**-6)
    with ap.te_fp8_autocast("current"):
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss) and abs(loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad
    )
    for _ in ap.iter_microbatches(range(2)):
        with ap.te_fp8_autocast("current"):
            model(ids, labels=ids).loss.backward()
    fresh = _llama()
    fresh.load_state_dict(ap.get_plain_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=2**-6, atol=2**-6)
    assert ap.remove_te_linear(model) and type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


@pytest.mark.parametrize("recipe", ["delayed", "block", "mxfp8"])
def test_other_recipes_run_or_say_why_not(recipe):
    model = _llama()
    ids = IDS.cuda()
    ap.inject_te_linear(model, recipe=recipe)
    try:
        context = ap.te_fp8_autocast(recipe)
    except RuntimeError as exc:  # e.g. MXFP8 needs Blackwell; the message carries TE's reason
        assert "cannot run on this device" in str(exc)
        pytest.skip(str(exc))
    with context:
        loss = model(ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    ap.remove_te_linear(model)
