"""inject_te_mlp: a decoder layer's post-attention RMSNorm + gated MLP as one TE LayerNormMLP, on tiny HF
models with TE's module stood in for by ReferenceTELayerNormMLP (fp32 math outside FP8 autocast).
References: the same model unswapped (logits, grads, trained values), and refusals for the pairs and layers
that one LayerNormMLP would compute wrongly."""

from __future__ import annotations

import copy
import pickle
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import am_precision as ap
from am_precision.te_mlp import FusedNormMLP, NormInMLP

REF = ap.ReferenceTELayerNormMLP
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
# fp32: the reference multiplies by the norm weight before rounding, HF after (one fp32 rounding apart).
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _pair(build, **kw):
    """Two equal models with norm weights other than ones, so a missing or doubled norm shows."""
    models = build(**kw).train(), build(**kw).train()
    with torch.no_grad():
        for p, q in zip(*(m.parameters() for m in models)):
            if p.dim() == 1:
                p.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(p.numel()))
                q.copy_(p)
    return models


def _assert_same_step(model, plain):
    """One training step's logits and grads of `model` equal the plain model's (fp32 tolerance)."""
    out, ref = model(IDS, labels=IDS), plain(IDS, labels=IDS)
    torch.testing.assert_close(out.logits, ref.logits, **TOL)
    out.loss.backward()
    ref.loss.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)


def test_swapped_llama_equals_the_plain_model(tiny_llama):
    plain, model = _pair(tiny_llama)
    layer = model.model.layers[0]
    norm, mlp = layer.post_attention_layernorm, layer.mlp
    plan = ap.plan_te_mlp(model, mlp_cls=REF)
    assert [(r.name, r.taken, r.reason) for r in plan] == [
        (f"model.layers.{i}.mlp", True, "post_attention_layernorm + mlp 32->64->32") for i in range(2)
    ]
    handle = ap.inject_te_mlp(model, mlp_cls=REF)
    assert handle.taken == [r.name for r in plan] and handle.plan == plan
    assert isinstance(layer.mlp, FusedNormMLP) and isinstance(layer.post_attention_layernorm, NormInMLP)
    assert layer.mlp.gate_proj is mlp.gate_proj and layer.mlp.te.fc2_weight is mlp.down_proj.weight
    assert layer.mlp.te.layer_norm_weight is norm.weight is layer.post_attention_layernorm.weight
    assert not layer.mlp.te.zero_centered_gamma
    _assert_same_step(model, plain)
    assert set(model.state_dict()) == set(plain.state_dict())
    assert ap.inject_te_mlp(model, mlp_cls=REF) is handle  # idempotent
    handle.revert()


def test_undo_restores_identity_mode_and_trained_values(tiny_llama):
    model = tiny_llama().train()
    before = {n: m for n, m in model.named_modules() if n.endswith(("mlp", "post_attention_layernorm"))}
    ap.inject_te_mlp(model, mlp_cls=REF)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    logits = model(IDS).logits
    model.eval()
    assert ap.remove_te_mlp(model) and not ap.remove_te_mlp(tiny_llama())
    for name, module in before.items():
        assert model.get_submodule(name) is module and not module.training
    torch.testing.assert_close(model(IDS).logits, logits, **TOL)


def test_state_dict_loads_into_the_plain_model(tiny_llama):
    plain, model = _pair(tiny_llama)
    ap.inject_te_mlp(model, mlp_cls=REF)
    ap.inject_te_linear(model, linear_cls=ap.ReferenceTELinear)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight.mul_(2)  # a value the plain model does not have yet
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(ap.get_plain_state_dict(model))
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, **TOL)


def test_te_linear_leaves_the_fused_mlp_alone(tiny_llama):
    plain, model = _pair(tiny_llama)
    ap.inject_te_mlp(model, mlp_cls=REF)
    handle = ap.inject_te_linear(model, linear_cls=ap.ReferenceTELinear)
    reasons = {r.name: r.reason for r in handle.plan}
    assert reasons["model.layers.0.mlp.up_proj"] == "runs inside a TE LayerNormMLP (inject_te_mlp)"
    assert len(handle.taken) == 2 * 4  # q/k/v/o per layer
    torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, **TOL)


def test_deepcopy_and_pickle_give_independent_equal_models(tiny_llama):
    model = tiny_llama()
    ap.inject_te_mlp(model, mlp_cls=REF)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(clone(IDS).logits, model(IDS).logits, **TOL)
        mlp = clone.model.layers[0].mlp
        assert mlp.te.fc2_weight is mlp.down_proj.weight  # shared inside the copy, not with the original
        assert mlp.down_proj.weight is not model.model.layers[0].mlp.down_proj.weight
        with torch.no_grad():
            mlp.down_proj.weight.zero_()
        assert not torch.equal(clone(IDS).logits, model(IDS).logits)
        assert ap.remove_te_mlp(clone) and type(clone.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_bf16_model_within_rounding_of_the_plain_model(tiny_llama):
    plain, model = (m.to(torch.bfloat16) for m in _pair(tiny_llama))
    ap.inject_te_mlp(model, mlp_cls=REF)
    got, want = model(IDS).logits.float(), plain(IDS).logits.float()
    # One bf16 rounding of the norm output apart (2^-8 relative), carried through two layers.
    assert ((got - want).norm() / want.norm()).item() < 2**-6


def test_fp8_microbatches_train_close_to_bf16(tiny_llama):
    plain, model = _pair(tiny_llama)
    ap.inject_te_mlp(model, mlp_cls=REF)
    ref = plain(IDS, labels=IDS).loss.item()
    for _ in ap.iter_microbatches(range(2)):
        with ap.reference_fp8_autocast():
            loss = model(IDS, labels=IDS).loss
        loss.backward()
        # e4m3 keeps 3 mantissa bits: a tiny model's loss moves by well under 5%.
        assert torch.isfinite(loss) and abs(loss.item() - ref) < 0.05 * ref
    assert all(p.grad is not None for n, p in model.named_parameters() if "mlp" in n)


class _ZeroCenteredRMSNorm(nn.Module):
    """Gemma's RMSNorm: scales by 1 + weight."""

    def __init__(self, hidden: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(hidden).uniform_(-0.5, 0.5))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)


def test_zero_centered_norm_is_recognised(tiny_llama):
    plain, model = tiny_llama(), tiny_llama()
    for a, b in zip(plain.model.layers, model.model.layers):
        a.post_attention_layernorm = _ZeroCenteredRMSNorm(32)
        b.post_attention_layernorm = copy.deepcopy(a.post_attention_layernorm)
    ap.inject_te_mlp(model, mlp_cls=REF)
    assert model.model.layers[0].mlp.te.zero_centered_gamma
    torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, **TOL)


@pytest.mark.parametrize("act", ["gelu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_mlp_is_refused_with_the_reason(tiny_llama, act, dtype):
    # In bf16 the GELU MLP's output is within a few percent of the SiLU formula, about the dtype's tolerance:
    # the probe refuses it because a GELU gate fits better.
    model = tiny_llama(hidden_act=act).to(dtype)
    for row in ap.plan_te_mlp(model, mlp_cls=REF):
        assert not row.taken and "is not down(silu(gate(rmsnorm(x))) * up(rmsnorm(x)))" in row.reason
    with pytest.raises(ValueError, match="no decoder layer whose norm"):
        ap.inject_te_mlp(model, mlp_cls=REF)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_a_layer_using_the_norm_output_twice_is_refused_and_left_as_is(tiny_llama):
    model = tiny_llama()
    layer = model.model.layers[1]
    original = type(layer).forward

    def forward(self, hidden_states, *args, **kwargs):
        # A parallel branch on the norm's output besides the MLP (the swap would feed it unnormalized).
        out = original(self, hidden_states, *args, **kwargs)
        return out + 0.5 * self.post_attention_layernorm(hidden_states)

    layer.forward = types.MethodType(forward, layer)
    with pytest.raises(
        RuntimeError, match=r"uses the norm's output for more than its MLP|not the unmodified"
    ):
        ap.inject_te_mlp(model, mlp_cls=REF)
    assert type(layer.mlp).__name__ == "LlamaMLP" and vars(model).get("_am_te_mlp") is None


def test_mlp_called_on_another_tensor_raises(tiny_llama):
    model = tiny_llama()
    ap.inject_te_mlp(model, mlp_cls=REF)
    layer = model.model.layers[0]
    x = torch.randn(1, 4, 32)
    with pytest.raises(RuntimeError, match="not the unmodified tensor"):
        layer.mlp(x)
    y = layer.post_attention_layernorm(x)
    y.add_(1)  # modified in place after the norm handed it over
    with pytest.raises(RuntimeError, match="not the unmodified tensor"):
        layer.mlp(y)
    with pytest.raises(TypeError, match="hidden states only"):
        layer.post_attention_layernorm(x, 1)


def test_other_refusals_name_the_reason(tiny_llama):
    model = tiny_llama(intermediate_size=72)
    assert {r.reason for r in ap.plan_te_mlp(model, mlp_cls=REF)} == {
        "intermediate size 72 is not a multiple of 16 (FP8 GEMM)"
    }
    assert {r.reason for r in ap.plan_te_mlp(tiny_llama(hidden_size=48), recipe="mxfp8", mlp_cls=REF)} == {
        "hidden size 48 is not a multiple of 32 (FP8 GEMM)"
    }
    assert {r.reason for r in ap.plan_te_mlp(tiny_llama(mlp_bias=True), mlp_cls=REF)} == {
        "a projection has a bias (TE's LayerNormMLP is built without)"
    }
    hooked = tiny_llama()
    hooked.model.layers[0].mlp.register_forward_hook(lambda *a: None)
    reasons = [r.reason for r in ap.plan_te_mlp(hooked, mlp_cls=REF)]
    assert reasons[0] == "has module hooks (they would not move to the TE module)" and reasons[1].startswith(
        "post_attention_layernorm + mlp"
    )
    assert "runs on CUDA" in ap.plan_te_mlp(tiny_llama())[0].reason  # the real TE needs CUDA weights


@settings(max_examples=25, deadline=None)
@given(
    st.one_of(
        st.just("not a class"),
        st.integers(),
        st.sampled_from(["fp7", "", "CURRENT"]),
    )
)
def test_bad_arguments_raise_before_any_swap(bad):
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4
        )
    )
    if isinstance(bad, str) and bad in ("fp7", "", "CURRENT"):
        with pytest.raises((ValueError, TypeError), match="recipe"):
            ap.inject_te_mlp(model, recipe=bad, mlp_cls=REF)
    else:
        with pytest.raises(TypeError, match="mlp_cls"):
            ap.inject_te_mlp(model, mlp_cls=bad)
    with pytest.raises(TypeError, match="model"):
        ap.inject_te_mlp(object(), mlp_cls=REF)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


def test_a_model_the_probe_cannot_run_is_refused(tiny_llama):
    model = tiny_llama()

    def forward(self, *args, **kwargs):
        raise TypeError("this model needs pixel_values")

    model.forward = types.MethodType(forward, model)
    with pytest.raises(RuntimeError, match=r"probe forward of LlamaForCausalLM .* needs pixel_values"):
        ap.inject_te_mlp(model, mlp_cls=REF)
    assert type(model.model.layers[0].mlp).__name__ == "LlamaMLP"


@pytest.mark.parametrize("te_linear_first", [False, True], ids=["te_mlp_first", "te_linear_first"])
def test_either_order_with_fused_te_linear_equals_the_plain_model(tiny_llama, te_linear_first):
    plain, model = _pair(tiny_llama)
    linear = dict(linear_cls=ap.ReferenceTELinear, fuse=True)
    handles = []
    if te_linear_first:
        handles.append(ap.inject_te_linear(model, **linear))
    handles.append(ap.inject_te_mlp(model, mlp_cls=REF))
    if not te_linear_first:
        handles.append(ap.inject_te_linear(model, **linear))
        reasons = {r.name: r.reason for r in handles[-1].plan}
        assert reasons["model.layers.0.self_attn.q_proj"] == "32->32, one GEMM with k_proj, v_proj"
        assert reasons["model.layers.0.mlp.gate_proj"].startswith("runs inside a TE LayerNormMLP")
    _assert_same_step(model, plain)
    fresh = copy.deepcopy(plain)
    fresh.load_state_dict(ap.get_plain_state_dict(model))
    torch.testing.assert_close(fresh(IDS).logits, model(IDS).logits, **TOL)
    for handle in reversed(handles):
        handle.revert()
    assert all(type(m).__name__ in ("LlamaMLP",) for m in (layer.mlp for layer in model.model.layers))
    torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, **TOL)


@pytest.mark.parametrize("linears", [False, True], ids=["mlp", "mlp+fused-qkv"])
def test_compiled_layers_equal_the_plain_model_and_break_only_around_te_calls(tiny_llama, linears):
    """torch.compile per decoder layer over the swapped modules: the same numbers as the plain eager model.

    The TE calls (and the norm's hand-over) run eagerly between the layer's graphs, as real TE needs: the
    only graph breaks are at them, and a second step compiles nothing new.
    """
    from torch._dynamo.utils import counters

    plain, model = _pair(tiny_llama)
    ap.inject_te_mlp(model, mlp_cls=REF)
    if linears:
        ap.inject_te_linear(model, linear_cls=ap.ReferenceTELinear, fuse=[("q_proj", "k_proj", "v_proj")])
    torch._dynamo.reset()
    counters.clear()
    for layer in model.model.layers:
        layer.compile()
    _assert_same_step(model, plain)
    breaks = counters["graph_break"]
    assert breaks and all("run_eager" in reason for reason in breaks), dict(breaks)
    graphs = counters["stats"]["unique_graphs"]
    _assert_same_step(model, plain)  # a second step compiles nothing new
    assert counters["stats"]["unique_graphs"] == graphs
    torch._dynamo.reset()
