"""The patch protocol for every public patcher: idempotent, exact undo, refuses foreign stacks, checks contracts."""

import functools

import pytest
import transformers
from torch.nn.attention import SDPBackend

from am_kernels import patch_liger_kernel, patch_sdpa_backends, unpatch_liger_kernel, unpatch_sdpa_backends

PATCHERS = ["sdpa_backends", "liger_kernel"]


@pytest.fixture
def patcher(request, torch_ops):
    if request.param == "sdpa_backends":
        return functools.partial(patch_sdpa_backends, backends=[SDPBackend.MATH]), unpatch_sdpa_backends
    return functools.partial(patch_liger_kernel, ops=torch_ops), unpatch_liger_kernel


@pytest.mark.parametrize("patcher", PATCHERS, indirect=True)
def test_apply_twice_equals_once_and_undo_is_exact(patcher, tiny, kit):
    patch, unpatch = patcher
    model = tiny("llama")
    pristine = kit.instance_state(model)
    assert patch(model) is model
    once = kit.instance_state(model)
    assert once != pristine
    patch(model)
    kit.assert_same_state(once, kit.instance_state(model))
    assert unpatch(model) is model
    kit.assert_same_state(pristine, kit.instance_state(model))
    unpatch(model)
    kit.assert_same_state(pristine, kit.instance_state(model))


@pytest.mark.parametrize("patcher", PATCHERS, indirect=True)
def test_undo_refuses_a_foreign_patch_on_top(patcher, tiny, kit):
    patch, unpatch = patcher
    model = tiny("llama")
    pristine = kit.instance_state(model)
    patch(model)
    target = model if patch.func is patch_sdpa_backends else model.model.norm
    ours = vars(target)["forward"]
    target.forward = functools.wraps(ours)(lambda *a, **k: ours(*a, **k))
    with pytest.raises(RuntimeError, match="patched over"):
        unpatch(model)
    target.forward = ours  # the foreign patch is undone first
    unpatch(model)
    kit.assert_same_state(pristine, kit.instance_state(model))


def _drop_rope_call(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
    return hidden_states, None


def _old_head(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
    return None


@pytest.mark.parametrize(
    ("attr", "drifted", "qualname"),
    [
        ("LlamaAttention", _drop_rope_call, "LlamaAttention.forward"),
        ("LlamaForCausalLM", _old_head, "LlamaForCausalLM.forward"),
    ],
)
def test_contract_drift_raises_runtime_error_naming_function_and_version(
    tiny, torch_ops, monkeypatch, kit, attr, drifted, qualname
):
    from transformers.models.llama import modeling_llama

    model = tiny("llama")
    pristine = kit.instance_state(model)
    monkeypatch.setattr(getattr(modeling_llama, attr), "forward", drifted)
    with pytest.raises(RuntimeError, match=qualname) as info:
        patch_liger_kernel(model, ops=torch_ops)
    assert transformers.__version__ in str(info.value)
    kit.assert_same_state(pristine, kit.instance_state(model))  # nothing half-patched


def test_missing_module_class_is_contract_drift(tiny, torch_ops, monkeypatch):
    from am_kernels import liger_plans

    model = tiny("llama")
    drifted = liger_plans.LigerPlan(
        **{**vars(liger_plans.LIGER_PLANS["llama"]), "norm_class": "LlamaRMSNormV2"}
    )
    monkeypatch.setitem(liger_plans.LIGER_PLANS, "llama", drifted)
    with pytest.raises(RuntimeError, match=f"no LlamaRMSNormV2 module found.*{transformers.__version__}"):
        patch_liger_kernel(model, ops=torch_ops)


def test_failure_midway_reverts_everything(tiny, torch_ops, kit, monkeypatch):
    from am_kernels import _patch

    model = tiny("llama")
    pristine = kit.instance_state(model)
    real_apply = _patch.Patch.apply
    count = {"n": 0}

    def flaky(self, **kwargs):
        count["n"] += 1
        if count["n"] == 12:
            raise RuntimeError("simulated failure on the 12th patch")
        real_apply(self, **kwargs)

    monkeypatch.setattr(_patch.Patch, "apply", flaky)
    with pytest.raises(RuntimeError, match="12th"):
        patch_liger_kernel(model, ops=torch_ops)
    monkeypatch.undo()
    kit.assert_same_state(pristine, kit.instance_state(model))


def _rope_with_position_ids(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
    return q, k


def _rope_other_default(q, k, cos, sin, unsqueeze_dim=2):
    return q, k


def _base_returning_tuple(self, input_ids=None, attention_mask=None, **kwargs) -> tuple:
    return (None,)


def _drift_rope(drifted):
    def apply(monkeypatch):
        from transformers.models.llama import modeling_llama

        monkeypatch.setattr(modeling_llama, "apply_rotary_pos_emb", drifted)

    return apply


def _drift_base_output(monkeypatch):
    from transformers.models.llama import modeling_llama

    monkeypatch.setattr(modeling_llama.LlamaModel, "forward", _base_returning_tuple)


def _drift_loss_property(value):
    def apply(monkeypatch):
        monkeypatch.setattr(transformers.PreTrainedModel, "loss_function", value)

    return apply


@pytest.mark.parametrize(
    ("drift", "options", "qualname"),
    [
        (_drift_rope(_rope_with_position_ids), {}, "modeling_llama.apply_rotary_pos_emb"),
        (_drift_rope(_rope_other_default), {}, "modeling_llama.apply_rotary_pos_emb"),
        (_drift_base_output, {}, "LlamaModel.forward"),
        (
            _drift_loss_property(property(lambda self: _old_head)),
            {"cross_entropy": True, "fused_linear_cross_entropy": False},
            "PreTrainedModel.loss_function",
        ),
        (
            _drift_loss_property(lambda self: _old_head),
            {"cross_entropy": True, "fused_linear_cross_entropy": False},
            "PreTrainedModel.loss_function",
        ),
    ],
    ids=[
        "rope-extra-parameter",
        "rope-default",
        "base-output",
        "loss-property-ignores-instance",
        "loss-not-property",
    ],
)
def test_liger_contract_drift_raises_before_any_change(
    tiny, torch_ops, monkeypatch, kit, drift, options, qualname
):
    model = tiny("llama")
    pristine = kit.instance_state(model)
    drift(monkeypatch)
    with pytest.raises(RuntimeError, match=qualname) as info:
        patch_liger_kernel(model, ops=torch_ops, **options)
    assert transformers.__version__ in str(info.value)
    kit.assert_same_state(pristine, kit.instance_state(model))
