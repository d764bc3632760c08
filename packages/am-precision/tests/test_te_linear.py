"""inject_te_linear / plan_te_linear / remove_te_linear on tiny HF models, with TE's Linear stood in for by
ReferenceTELinear (exact F.linear outside FP8 autocast) or the FAKE transformer_engine of conftest.py."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from torch import nn

import am_precision as ap
from am_precision import te_linear

REF = ap.ReferenceTELinear


def _llama(**kw):
    config = transformers.LlamaConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        **kw,
    )
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, REF))}


IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))


def test_llama_swaps_every_projection_but_lm_head_and_keeps_logits():
    model = _llama()
    before = _linears(model)
    ref = model(IDS).logits
    plan = ap.plan_te_linear(model, linear_cls=REF)
    assert [r.name for r in plan if not r.taken] == ["lm_head"]
    assert "include_lm_head=True" in plan[0].reason and sum(r.taken for r in plan) == 14
    handle = ap.inject_te_linear(model, linear_cls=REF)
    assert len(handle.taken) == 14 and handle.recipe == "current"
    for name in handle.taken:
        new = model.get_submodule(name)
        assert type(new) is REF
        assert new.weight is before[name].weight  # the same Parameter object, not a copy
        assert "bias" not in dict(
            new.named_parameters()
        )  # Llama projections have none; TE keeps a plain tensor
    assert type(model.lm_head) is nn.Linear
    # ReferenceTELinear is F.linear outside FP8 autocast: the swapped model's logits are bit-identical.
    assert torch.equal(model(IDS).logits, ref)
    assert all(r.reason == "swapped" for r in ap.plan_te_linear(model, linear_cls=REF) if r.taken)
    handle.revert()


def test_qwen2_moe_skips_the_gates_with_a_reason():
    config = transformers.AutoConfig.for_model(
        "qwen2_moe",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    plan = {r.name: r for r in ap.plan_te_linear(model, linear_cls=REF)}
    for layer in (0, 1):
        assert not plan[f"model.layers.{layer}.mlp.shared_expert_gate"].taken
        assert "router/gate" in plan[f"model.layers.{layer}.mlp.shared_expert_gate"].reason
    ref = model(IDS).logits
    handle = ap.inject_te_linear(model, linear_cls=REF)
    # 4 attention projections + 3 shared-expert projections per layer; routers and fused experts untouched.
    assert len(handle.taken) == 14
    assert type(model.model.layers[0].mlp.shared_expert_gate) is nn.Linear
    torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    assert ap.remove_te_linear(model)


class _MoE(nn.Module):
    """An older-style MoE block whose router is an nn.Linear (Mixtral before transformers 5)."""

    def __init__(self):
        super().__init__()
        self.scorer = nn.Linear(32, 16, bias=False)  # as many outputs as experts, next to `experts`
        self.router = nn.Linear(32, 32)
        self.experts = nn.ModuleList(nn.Linear(32, 32) for _ in range(2))


class _Zoo(nn.Module):
    def __init__(self):
        super().__init__()
        self.config = transformers.PretrainedConfig(num_experts=16)
        self.embed = nn.Embedding(64, 32)
        self.tied = nn.Linear(32, 64, bias=False)
        self.tied.weight = self.embed.weight
        self.odd = nn.Linear(32, 30)
        self.sub = type("LoRALinear", (nn.Linear,), {})(32, 32)
        self.hooked = nn.Linear(32, 32)
        self.hooked.register_forward_hook(lambda *a: None)
        self.wide = nn.Linear(48, 32).double()
        self.mlp = nn.Module()
        self.mlp.down_proj = nn.Linear(32, 32)
        self.mlp.up_proj = nn.Linear(32, 48)
        self.moe = _MoE()
        self.shared = nn.Linear(32, 32)
        self.alias = self.shared  # one module under two names: listed once, swapped at both places


def test_plan_reasons():
    model = _Zoo()
    plan = {r.name: r for r in ap.plan_te_linear(model, skip=["mlp.down_proj"], linear_cls=REF)}
    reasons = {n: r.reason for n, r in plan.items() if not r.taken}
    assert reasons["tied"] == "weight tied to embedding embed"
    assert reasons["odd"] == "out_features=30 is not a multiple of 16 (FP8 GEMM)"
    assert "LoRALinear subclasses nn.Linear" in reasons["sub"]
    assert "hooks" in reasons["hooked"]
    assert "torch.float64" in reasons["wide"]
    assert reasons["mlp.down_proj"] == "skipped by skip=['mlp.down_proj']"
    assert "router" in reasons["moe.scorer"] and "router" in reasons["moe.router"]
    assert "alias" not in plan and plan["shared"].taken
    assert reasons["moe.experts.0"].startswith("MoE expert")
    assert {n for n, r in plan.items() if r.taken} == {"mlp.up_proj", "shared"}
    mx = {r.name: r.reason for r in ap.plan_te_linear(model, recipe="mxfp8", linear_cls=REF)}
    assert mx["mlp.up_proj"] == "out_features=48 is not a multiple of 32 (FP8 GEMM)"
    # Real TE (no linear_cls) runs on CUDA only: CPU weights are refused with that reason, without importing TE.
    real = {r.name: r.reason for r in ap.plan_te_linear(model)}
    assert real["shared"] == "weight on cpu: transformer_engine.pytorch.Linear runs on CUDA"
    handle = ap.inject_te_linear(model, skip=["mlp.down_proj"], linear_cls=REF)
    assert model.alias is model.shared and type(model.shared) is REF
    handle.revert()
    assert model.alias is model.shared and type(model.shared) is nn.Linear


def test_fp32_kept_dtensor_and_meta_are_refused(monkeypatch):
    class KeepLlama(transformers.LlamaForCausalLM):
        _keep_in_fp32_modules_strict = ["mlp.down_proj"]  # noqa: RUF012

    model = KeepLlama(_llama().config)
    plan = {r.name: r.reason for r in ap.plan_te_linear(model, linear_cls=REF)}
    assert plan["model.layers.0.mlp.down_proj"] == "kept in fp32 by _keep_in_fp32_modules(_strict)"
    assert plan["model.layers.0.mlp.up_proj"] == "32->64"
    sharded = model.model.layers[1].self_attn.q_proj
    monkeypatch.setattr(te_linear, "has_dtensor_params", lambda m: m is sharded)
    plan = {r.name: r.reason for r in ap.plan_te_linear(model, linear_cls=REF)}
    assert plan["model.layers.1.self_attn.q_proj"].startswith("DTensor weight")
    with torch.device("meta"):
        meta = transformers.LlamaForCausalLM(model.config)
    assert all(
        r.reason.startswith("weight on the meta device")
        for r in ap.plan_te_linear(meta, linear_cls=REF)
        if r.name != "lm_head"
    )


def test_undo_restores_identity_and_trained_values():
    model = _llama().train()
    before = _linears(model)
    snapshot = {n: dict(vars(m)) for n, m in before.items()}
    parents = {n: dict(model.get_submodule(n.rpartition(".")[0])._modules) for n in before if "." in n}
    handle = ap.inject_te_linear(model, linear_cls=REF)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model(IDS, labels=IDS).loss.backward()
    opt.step()
    trained = {n: model.get_submodule(n).weight.detach().clone() for n in handle.taken}
    logits = model(IDS).logits
    assert ap.remove_te_linear(model) and not ap.remove_te_linear(model)
    assert not hasattr(model, te_linear.RECORD_ATTR)
    for name, module in before.items():
        assert model.get_submodule(name) is module and dict(vars(module)) == snapshot[name]
    for name, children in parents.items():
        assert dict(model.get_submodule(name.rpartition(".")[0])._modules) == children
    for name in handle.taken:  # the optimizer trained the original modules' own Parameters
        assert torch.equal(before[name].weight, trained[name])
    torch.testing.assert_close(model(IDS).logits, logits, rtol=0, atol=0)
    with ap.inject_te_linear(model, linear_cls=REF):
        model.eval()  # reaches only the TE modules while they are in the tree ...
    assert not any(m.training for m in model.modules())  # ... and the restored originals follow it


def test_inject_is_idempotent_and_a_context_manager():
    model = _llama()
    first = ap.inject_te_linear(model, linear_cls=REF)
    modules = dict(model.named_modules())
    assert ap.inject_te_linear(model, linear_cls=REF) is first
    assert dict(model.named_modules()) == modules
    first.revert()
    with ap.inject_te_linear(model, linear_cls=REF) as second:
        assert second is not first and type(model.model.layers[0].mlp.up_proj) is REF
    assert type(model.model.layers[0].mlp.up_proj) is nn.Linear


def test_deepcopy_carries_its_own_handle():
    model = _llama()
    ap.inject_te_linear(model, linear_cls=REF)
    twin = copy.deepcopy(model)
    assert ap.remove_te_linear(twin)
    assert type(twin.model.layers[0].mlp.up_proj) is nn.Linear
    assert type(model.model.layers[0].mlp.up_proj) is REF
    ap.remove_te_linear(model)


def test_state_dict_round_trip_into_the_plain_model():
    model = _llama()
    handle = ap.inject_te_linear(model, linear_cls=REF)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    full = model.state_dict()
    extra = [k for k in full if k.endswith("_extra_state")]
    assert len(extra) == 14 and all(k.rpartition(".")[0] in handle.taken for k in extra)
    plain_sd = ap.get_plain_state_dict(model)
    assert set(plain_sd) == set(full) - set(extra)
    plain = _llama()
    with pytest.raises(RuntimeError, match="_extra_state"):
        plain.load_state_dict(full)  # why get_plain_state_dict exists
    plain.load_state_dict(plain_sd)  # strict
    assert set(plain.state_dict()) == set(plain_sd)
    for key, value in plain.state_dict().items():
        assert torch.equal(value, plain_sd[key]), key
    torch.testing.assert_close(plain(IDS).logits, model(IDS).logits, rtol=0, atol=0)
    # A plain checkpoint loads into the swapped model with strict=False; only _extra_state is missing.
    result = model.load_state_dict(plain.state_dict(), strict=False)
    assert sorted(result.missing_keys) == sorted(extra) and not result.unexpected_keys
    handle.revert()


def test_first_microbatch_flag_reaches_the_swapped_layers():
    model = _llama()
    ap.inject_te_linear(model, linear_cls=REF)
    proj = model.model.layers[0].mlp.down_proj
    x = torch.randn(4, 64)
    with ap.reference_fp8_autocast():
        outs = []
        for step, _ in enumerate(ap.iter_microbatches(range(2))):
            outs.append(proj(x))
            if step == 0:  # a weight change between microbatches is invisible: the cached FP8 weight is used
                with torch.no_grad():
                    proj.weight.mul_(2)
        assert ap.get_is_first_microbatch() is None
        assert torch.equal(outs[0], outs[1])
        assert not torch.equal(proj(x), outs[0])  # flag None: quantized afresh every call
    ap.remove_te_linear(model)


def test_default_factory_is_te_linear_and_gets_the_flag(fake_te, monkeypatch):
    monkeypatch.setattr(te_linear, "TE_DEVICE_TYPE", "cpu")  # the fake runs where the model is
    model = _llama()
    ref = model(IDS).logits
    handle = ap.inject_te_linear(model)
    assert len(handle.taken) == 14 and all(
        type(model.get_submodule(n)) is fake_te.te.Linear for n in handle.taken
    )
    for _ in ap.iter_microbatches(range(3)):
        torch.testing.assert_close(model(IDS).logits, ref, rtol=0, atol=0)
    assert fake_te.calls["linear"] == [True] * 14 + [False] * 28
    fake_te.calls["linear"].clear()
    ap.set_is_first_microbatch(False)
    ap.patch_te_modules()  # the class-level TE patch composes with the per-instance flag
    model.model.layers[0].mlp.up_proj(torch.randn(2, 32), is_first_microbatch=True)  # explicit wins
    model.model.layers[0].mlp.up_proj(torch.randn(2, 32))
    assert fake_te.calls["linear"] == [True, False]
    ap.unpatch_te_modules()
    ap.set_is_first_microbatch(None)
    handle.revert()


def test_fp8_autocast_uses_the_recipe(fake_te):
    for name, cls in ap.FP8_RECIPES.items():
        with ap.te_fp8_autocast(name):
            pass
        enabled, recipe = fake_te.calls["autocast"][-1]
        assert enabled is True and type(recipe).__name__ == cls
    prebuilt = fake_te.recipes.DelayedScaling()
    with ap.te_fp8_autocast(ap.TEFp8Config(recipe=prebuilt)):
        pass
    assert fake_te.calls["autocast"][-1] == (True, prebuilt)


def test_fp8_autocast_checks_the_gpu_and_falls_back_to_fp8_autocast(fake_te, monkeypatch):
    monkeypatch.setattr(
        fake_te.te,
        "is_mxfp8_available",
        lambda return_reason=False: (False, "compute capability 10.0 required"),
        raising=False,
    )
    with pytest.raises(
        RuntimeError, match=r"MXFP8BlockScaling cannot run on this device: compute capability 10.0"
    ):
        ap.te_fp8_autocast("mxfp8")
    seen = []

    def fp8_autocast(enabled=False, calibrating=False, fp8_recipe=None, fp8_group=None):
        seen.append((enabled, type(fp8_recipe).__name__))
        return torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t)

    monkeypatch.delattr(fake_te.te, "autocast")
    monkeypatch.setattr(fake_te.te, "fp8_autocast", fp8_autocast, raising=False)
    with ap.te_fp8_autocast("block"):
        pass
    assert seen == [(True, "Float8BlockScaling")]


def test_bad_inputs_raise_naming_them():
    with pytest.raises(ValueError, match=r"inject_te_linear: _Only has no nn.Linear.*output projection"):

        class _Only(nn.Module):
            def __init__(self):
                super().__init__()
                self.lm_head = nn.Linear(32, 64)

        ap.inject_te_linear(_Only(), linear_cls=REF)
    with pytest.raises(
        ValueError, match=r"recipe='fp4' is not an FP8 recipe.*'current', 'delayed', 'block', 'mxfp8'"
    ):
        ap.inject_te_linear(_llama(), recipe="fp4", linear_cls=REF)
    with pytest.raises(ImportError, match=r"transformer-engine is not installed.*am-precision\[te\]"):
        ap.inject_te_linear(_llama())
    with pytest.raises(ImportError, match=r"am-precision\[te\]"):
        ap.te_fp8_autocast("current")
    with pytest.raises(TypeError, match="skip must be a list"):
        ap.plan_te_linear(_llama(), skip="lm_head")
    with pytest.raises(TypeError, match="linear_cls must be None or a class"):
        ap.inject_te_linear(_llama(), linear_cls=3)


def test_a_broken_factory_changes_nothing():
    class NoFlag(REF):
        def forward(self, inp):
            return super().forward(inp)

    class Renamed(nn.Module):
        def __init__(self, i, o, *, bias, params_dtype, device):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(o, i))

        def forward(self, inp, is_first_microbatch=None):
            return inp

    model = _llama()
    before = dict(model.named_modules())
    with pytest.raises(RuntimeError, match=r"NoFlag\.forward.*no longer takes is_first_microbatch"):
        ap.inject_te_linear(model, linear_cls=NoFlag)
    with pytest.raises(RuntimeError, match=r"Renamed: expected parameters \{'weight': \(32, 32\)\}"):
        ap.inject_te_linear(model, linear_cls=Renamed)
    assert dict(model.named_modules()) == before and not hasattr(model, te_linear.RECORD_ATTR)


def test_revert_refuses_a_foreign_module_stacked_on_ours():
    model = _llama()
    handle = ap.inject_te_linear(model, linear_cls=REF)
    ours = model.model.layers[0].mlp.up_proj
    model.model.layers[0].mlp.up_proj = nn.Identity()
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        ap.remove_te_linear(model)
    assert type(model.model.layers[1].mlp.up_proj) is REF  # checked before anything was reverted
    model.model.layers[0].mlp.up_proj = ours
    handle.revert()
