"""Patch-protocol suite for every public patcher (the TE patches, on the FAKE transformer_engine)."""

import pytest

import am_precision
from am_precision._patch import patch_name


def _forwards(te):
    return {name: vars(getattr(te, name)).get("forward") for name in ("Linear", "GroupedLinear", "RMSNorm")}


def _vars(te):
    return {name: dict(vars(getattr(te, name))) for name in ("Linear", "GroupedLinear", "RMSNorm")}


def test_apply_twice_equals_once_and_revert_restores_identity(fake_te):
    before_forwards, before_vars = _forwards(fake_te.te), _vars(fake_te.te)
    first = am_precision.patch_te_modules()
    after_once = _forwards(fake_te.te)
    second = am_precision.patch_te_modules()
    assert second is first and _forwards(fake_te.te) == after_once
    assert all(patch_name(f) for f in after_once.values())
    am_precision.unpatch_te_modules()
    restored = _forwards(fake_te.te)
    assert all(restored[k] is before_forwards[k] for k in restored)
    assert _vars(fake_te.te) == before_vars
    am_precision.unpatch_te_modules()  # undo before/after apply is a no-op


def test_handle_is_a_context_manager(fake_te):
    before = _forwards(fake_te.te)
    patcher = am_precision.make_lazy_te_patcher(lambda: fake_te.te)
    with patcher as handle:
        assert handle.applied
    assert _forwards(fake_te.te) == before


def test_revert_of_foreign_repatch_raises(fake_te):
    am_precision.patch_te_modules()
    foreign = lambda self, inp, is_first_microbatch=None: inp  # noqa: E731
    ours = fake_te.te.Linear.forward
    fake_te.te.Linear.forward = foreign
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        am_precision.unpatch_te_modules()
    fake_te.te.Linear.forward = ours
    am_precision.unpatch_te_modules()


def test_contract_drift_raises_naming_function_and_version(fake_te, monkeypatch):
    def drifted(self, inp, fp8_output=False):
        return inp

    monkeypatch.setattr(fake_te.te.Linear, "forward", drifted)
    with pytest.raises(
        RuntimeError, match=r"Linear\.forward.*is_first_microbatch.*transformer_engine 0\.0-fake"
    ):
        am_precision.patch_te_modules()
    assert not am_precision.te_lazy._default_patcher.applied
    assert vars(fake_te.te.Linear)["forward"] is drifted
    assert patch_name(vars(fake_te.te.GroupedLinear).get("forward")) is None  # all-or-nothing


def test_inject_te_linear_contract_drift_names_function_and_version(fake_te, monkeypatch):
    import torch
    import transformers

    from am_precision import te_linear

    def drifted(self, inp, fp8_output=False):
        return inp

    monkeypatch.setattr(te_linear, "TE_DEVICE_TYPE", "cpu")
    monkeypatch.setattr(fake_te.te.Linear, "forward", drifted)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = transformers.LlamaForCausalLM(config)
    before = dict(model.named_modules())
    with pytest.raises(
        RuntimeError, match=r"Linear\.forward.*is_first_microbatch.*transformer_engine 0\.0-fake"
    ):
        am_precision.inject_te_linear(model)
    assert dict(model.named_modules()) == before and not am_precision.remove_te_linear(model)
    assert isinstance(model.lm_head.weight, torch.nn.Parameter)
