"""inject_te_linear(fuse=True): sibling projections (q/k/v, gate/up) share one TE Linear, on tiny HF models
with TE's Linear stood in for by ReferenceTELinear (exact F.linear outside FP8 autocast). References: the
same model unswapped (logits, grads, trained values) and F.linear of each member's own weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import am_precision as ap
from am_precision.te_fused import FusedProjection

REF = ap.ReferenceTELinear
IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
# Fusing changes only the GEMM's blocking (one [q;k;v] product instead of three): fp32 rounding noise.
TOL = {"rtol": 1e-5, "atol": 1e-6}


def _count_gemms(model):
    calls = []
    tes = {id(m.group.te): m.group.te for m in model.modules() if isinstance(m, FusedProjection)}
    tes |= {id(m): m for m in model.modules() if type(m) is REF}
    for te in tes.values():
        te.register_forward_hook(lambda mod, args, out: calls.append(mod))
    return calls


def test_fused_llama_equals_the_plain_model_with_fewer_gemms(tiny_llama):
    plain, model = tiny_llama().train(), tiny_llama().train()
    weights = {n: m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    plan = ap.plan_te_linear(model, linear_cls=REF, fuse=True)
    reasons = {r.name: r.reason for r in plan}
    assert reasons["model.layers.0.self_attn.q_proj"] == "32->32, one GEMM with k_proj, v_proj"
    assert reasons["model.layers.1.mlp.up_proj"] == "32->64, one GEMM with gate_proj"
    assert reasons["model.layers.0.self_attn.o_proj"] == "32->32"
    handle = ap.inject_te_linear(model, linear_cls=REF, fuse=True)
    assert len(handle.taken) == 14 and handle.plan == plan
    for name in handle.taken:
        assert model.get_submodule(name).weight is weights[name]  # the original Parameter objects
    calls = _count_gemms(model)
    loss = model(IDS, labels=IDS).loss
    assert len(calls) == 2 * 4  # per layer: [q;k;v], o, [gate;up], down (was 7)
    ref = plain(IDS, labels=IDS).loss
    torch.testing.assert_close(loss, ref, **TOL)
    loss.backward()
    ref.backward()
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, **TOL, msg=name)
    # The members carry the plain HF keys; only the unfused TE Linears (o_proj, down_proj) add extra state.
    extra = {k for k in model.state_dict() if k.endswith("._extra_state")}
    assert {k.split(".")[-2] for k in extra} == {"o_proj", "down_proj"}
    assert set(model.state_dict()) - extra == set(plain.state_dict())
    handle.revert()


def test_undo_restores_identity_and_the_trained_values(tiny_llama):
    model = tiny_llama().train()
    before = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    handle = ap.inject_te_linear(model, linear_cls=REF, fuse=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    trained = {n: model.get_submodule(n).weight.detach().clone() for n in handle.taken}
    logits = model(IDS).logits
    model.eval()
    assert ap.remove_te_linear(model)
    for name, module in before.items():
        assert model.get_submodule(name) is module and not module.training
    for name in handle.taken:
        assert torch.equal(before[name].weight, trained[name])
    torch.testing.assert_close(model(IDS).logits, logits, **TOL)


def test_deepcopy_gives_an_independent_equal_model(tiny_llama):
    model = tiny_llama()
    ap.inject_te_linear(model, linear_cls=REF, fuse=True)
    ref = model(IDS).logits
    for twin in (copy.deepcopy(model), copy.deepcopy(copy.deepcopy(model))):
        q = twin.model.layers[0].self_attn.q_proj
        assert (
            isinstance(q, FusedProjection) and q.weight is not model.model.layers[0].self_attn.q_proj.weight
        )
        assert q.group.te.q_proj_weight is q.weight  # the copy's TE Linear holds the copy's Parameters
        assert q.group is twin.model.layers[0].self_attn.v_proj.group
        torch.testing.assert_close(twin(IDS).logits, ref, rtol=0, atol=0)
        with torch.no_grad():
            q.weight.zero_()
        assert not torch.equal(twin(IDS).logits, ref) and torch.equal(model(IDS).logits, ref)


def test_plain_state_dict_loads_into_the_fused_model(tiny_llama):
    plain, model = tiny_llama(), tiny_llama()
    ap.inject_te_linear(model, linear_cls=REF, fuse=True)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(0.01 * torch.randn_like(p))
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    assert not any(k.split(".")[-2] in ("q_proj", "up_proj") for k in result.missing_keys)
    plain.load_state_dict(ap.get_plain_state_dict(model))  # and back, strictly
    torch.testing.assert_close(model(IDS).logits, plain(IDS).logits, **TOL)


def test_what_is_not_fused():
    class Cross(nn.Module):  # keys and values read another sequence
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(32, 32, bias=False) for _ in range(3))

    class Mixed(nn.Module):  # q has a bias, k and v do not; gate/up differ in input width
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(32, 32)
            self.k_proj, self.v_proj = nn.Linear(32, 16, bias=False), nn.Linear(32, 16, bias=False)
            self.gate_proj, self.up_proj = nn.Linear(32, 64, bias=False), nn.Linear(48, 64, bias=False)

    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder_attn, self.cross_attention, self.mixed = Cross(), Cross(), Mixed()
            self.mixed.shared = self.mixed.k_proj  # a module under two names keeps its own TE Linear
            self.skipped = Cross()

    model = Root()
    plan = {
        r.name: r.reason for r in ap.plan_te_linear(model, linear_cls=REF, fuse=True, skip=["skipped.v_proj"])
    }
    assert plan["encoder_attn.q_proj"] == plan["cross_attention.k_proj"] == "32->32"
    assert (plan["mixed.q_proj"], plan["mixed.gate_proj"], plan["mixed.up_proj"]) == (
        "32->32",
        "32->64",
        "48->64",
    )
    assert plan["mixed.k_proj"] == "32->16" and plan["mixed.v_proj"] == "32->16"
    assert plan["skipped.q_proj"] == "32->32, one GEMM with k_proj"  # what is eligible still fuses
    assert plan["skipped.v_proj"].startswith("skipped by")


@settings(max_examples=60, deadline=None)
@given(
    calls=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 1), st.booleans(), st.booleans()), min_size=1, max_size=10
    )
)
def test_every_call_is_its_own_linear_whatever_the_call_order(calls):
    """Any order of member calls, on shared or distinct inputs modified in place or not, under grad or
    no_grad, gives each member exactly F.linear of its own weight (the cache never serves a stale output)."""
    torch.manual_seed(0)
    parent = nn.Module()
    parent.q_proj, parent.k_proj, parent.v_proj = (nn.Linear(16, n, bias=True) for n in (16, 32, 16))
    ap.inject_te_linear(parent, linear_cls=REF, fuse=True)
    members = [parent.q_proj, parent.k_proj, parent.v_proj]
    inputs = [torch.randn(3, 16), torch.randn(3, 16)]
    for member, which, modify, grad in calls:
        if modify:
            inputs[which].mul_(1.5)
        with torch.set_grad_enabled(grad):
            out = members[member](inputs[which])
        m = members[member]
        torch.testing.assert_close(out, F.linear(inputs[which], m.weight, m.bias), **TOL)
        assert out.requires_grad == grad


def test_first_microbatch_flag_reaches_the_group(tiny_llama):
    model = tiny_llama()
    ap.inject_te_linear(model, linear_cls=REF, fuse=True)
    attn = model.model.layers[0].self_attn
    x = torch.randn(4, 32)
    with ap.reference_fp8_autocast():
        outs = []
        for step, _ in enumerate(ap.iter_microbatches(range(2))):
            outs.append(attn.k_proj(x))
            if step == 0:  # the cached FP8 weight is reused on the second microbatch
                with torch.no_grad():
                    attn.k_proj.weight.mul_(2)
        assert torch.equal(outs[0], outs[1])
        assert not torch.equal(attn.k_proj(x), outs[0])


def test_fuse_names_the_groups(tiny_llama):
    plain, model = tiny_llama().train(), tiny_llama().train()
    handle = ap.inject_te_linear(model, linear_cls=REF, fuse=[("q_proj", "k_proj", "v_proj")])
    reasons = {r.name: r.reason for r in handle.plan}
    assert reasons["model.layers.0.self_attn.k_proj"] == "32->16, one GEMM with q_proj, v_proj"
    assert reasons["model.layers.0.mlp.up_proj"] == "32->64"
    calls = _count_gemms(model)
    loss = model(IDS, labels=IDS).loss
    assert len(calls) == 2 * 5  # per layer: [q;k;v], o, gate, up, down
    torch.testing.assert_close(loss, plain(IDS, labels=IDS).loss, **TOL)


@pytest.mark.parametrize(
    ("fuse", "error"),
    [
        ("yes", TypeError),
        (1, TypeError),
        ([("q_proj",)], TypeError),
        ([("q_proj", 3)], TypeError),
        (["q_proj"], TypeError),
        ([], ValueError),
        ([("q_proj", "k_proj"), ("k_proj", "v_proj")], ValueError),
    ],
)
def test_bad_fuse_is_refused(fuse, error, tiny_llama):
    model = tiny_llama()
    with pytest.raises(error, match="fuse"):
        ap.inject_te_linear(model, linear_cls=REF, fuse=fuse)
    with pytest.raises(error, match="fuse"):
        ap.plan_te_linear(model, linear_cls=REF, fuse=fuse)
    assert not any(type(m) is REF for m in model.modules())


def test_members_outputs_are_their_own_tensors():
    """A layer that modifies one projection in place, and a loss that reads only some members, train
    exactly as unfused: each member's output is a contiguous tensor of its own (no view of the group's
    output), and an unused member's gradient is zero."""
    torch.manual_seed(0)
    plain = nn.Module()
    plain.q_proj, plain.k_proj, plain.v_proj = (nn.Linear(16, n, bias=True) for n in (32, 16, 16))
    fused = copy.deepcopy(plain)
    ap.inject_te_linear(fused, linear_cls=REF, fuse=True)
    x = torch.randn(2, 5, 16)
    assert isinstance(fused.k_proj, FusedProjection)
    grads = []
    for parent in (plain, fused):
        xi = x.clone().requires_grad_()
        q, k = parent.q_proj(xi), parent.k_proj(xi)
        parent.v_proj(xi)  # computed, never used
        q.mul_(3.0)
        if parent is fused:
            assert q.is_contiguous() and k.is_contiguous() and q._base is None and k._base is None
        ((q[..., :16] * k).sum() + q.square().sum()).backward()
        grads.append([xi.grad] + [p.grad for p in parent.parameters()])
    unused = {id(p) for p in plain.v_proj.parameters()}
    for got, want, p in zip(grads[1], grads[0], [None, *plain.parameters()]):
        if id(p) in unused:  # unfused: no gradient at all; fused: the group's GEMM gives it zeros
            assert want is None and not got.any()
        else:
            torch.testing.assert_close(got, want, **TOL)
