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


def test_real_te_fused_siblings_match_the_unfused_swap():
    """fuse=True on the real TE (parameters_split): in bf16 (no FP8 autocast) its logits and grads equal the
    unfused swap's to bf16 rounding (one [q;k;v] GEMM reassociates nothing: each output element is still one
    row-by-column dot product, so only cuBLAS's choice of kernel differs); under FP8 the step trains."""
    import transformer_engine.pytorch as te

    from am_precision.te_fused import FusedProjection

    fused, unfused = _llama(), _llama()
    ids = IDS.cuda()
    handle = ap.inject_te_linear(fused, fuse=True)
    ap.inject_te_linear(unfused)
    q = fused.model.layers[0].self_attn.q_proj
    assert isinstance(q, FusedProjection) and isinstance(q.group.te, te.Linear)
    assert q.group.te.q_proj_weight is q.weight
    out, ref = fused(ids, labels=ids), unfused(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=2**-6, atol=2**-6)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), r in zip(fused.named_parameters(), unfused.parameters()):
        rel = ((p.grad.float() - r.grad.float()).norm() / r.grad.float().norm().clamp_min(1e-12)).item()
        assert rel < 2**-6, f"{name}: relative grad difference {rel}"
    for _ in ap.iter_microbatches(range(2)):
        with ap.te_fp8_autocast("current"):
            loss = fused(ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss) and abs(loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()
    plain = _llama()
    plain.load_state_dict(ap.get_plain_state_dict(fused))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, fused(ids).logits, rtol=2**-6, atol=2**-6)
    handle.revert()
    assert type(fused.model.layers[0].self_attn.q_proj) is torch.nn.Linear


def test_real_te_layernorm_mlp_matches_the_plain_model():
    """inject_te_mlp on the real TE: in bf16 (no FP8 autocast) the model's logits and grads equal the plain
    model's to bf16 rounding (TE rounds the norm once after scaling by the weight, HF before: one bf16 ulp,
    2^-8 relative, per norm output), under FP8 gradient-accumulation microbatches the step trains, the
    state_dict loads into the plain model, and undo restores the original modules."""
    import transformer_engine.pytorch as te

    from am_precision.te_mlp import FusedNormMLP

    model, plain = _llama(), _llama()
    with torch.no_grad():  # norm weights other than ones, so a misplaced or missing norm shows
        for p, q in zip(model.parameters(), plain.parameters()):
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
                q.copy_(p)
    originals = {n: m for n, m in model.named_modules() if n.endswith(("mlp", "post_attention_layernorm"))}
    ids = IDS.cuda()
    handle = ap.inject_te_mlp(model)
    mlp = model.model.layers[0].mlp
    assert isinstance(mlp, FusedNormMLP) and isinstance(mlp.te, te.LayerNormMLP)
    assert mlp.te.fc2_weight is mlp.down_proj.weight
    assert mlp.te.layer_norm_weight is model.model.layers[0].post_attention_layernorm.weight
    ap.inject_te_linear(model)  # the remaining q/k/v/o
    out, ref = model(ids, labels=ids), plain(ids, labels=ids)
    torch.testing.assert_close(out.logits, ref.logits, rtol=2**-5, atol=2**-5)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), r in zip(model.named_parameters(), plain.parameters()):
        rel = ((p.grad.float() - r.grad.float()).norm() / r.grad.float().norm().clamp_min(1e-12)).item()
        assert rel < 2**-5, f"{name}: relative grad difference {rel}"
    for _ in ap.iter_microbatches(range(2)):
        with ap.te_fp8_autocast("current"):
            loss = model(ids, labels=ids).loss
        loss.backward()
        assert torch.isfinite(loss) and abs(loss.item() - ref.loss.item()) < 0.05 * ref.loss.item()
    fresh = _llama()
    fresh.load_state_dict(ap.get_plain_state_dict(model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=2**-5, atol=2**-5)
    ap.remove_te_linear(model)
    handle.revert()
    for name, module in originals.items():
        assert model.get_submodule(name) is module
