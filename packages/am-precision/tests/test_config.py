import warnings

import pytest
import torch

from am_precision import BackendConfig, TEFp8Config
from am_precision.config import dtype_from_str


def test_defaults_without_te_or_cuda():
    cfg = BackendConfig()
    assert (cfg.attn, cfg.linear, cfg.rms_norm, cfg.rope_fusion) == ("sdpa", "torch", "torch_fp32", False)
    assert (cfg.experts, cfg.dispatcher, cfg.te_fp8, cfg.uses_te) == ("torch", "torch", None, False)


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("attn", "flash", "['te', 'sdpa', 'flex', 'eager', 'tilelang']"),
        ("linear", "apex", "['torch', 'te']"),
        ("rms_norm", "fp32", "['torch', 'torch_fp32', 'te']"),
        ("experts", "loop", "['torch', 'te', 'gmm', 'torch_mm', 'torch_mm_mxfp8']"),
        ("dispatcher", "nccl", "['torch', 'deepep', 'hybridep', 'uccl_ep']"),
    ],
)
def test_invalid_choice_lists_allowed(field, value, allowed):
    with pytest.raises(ValueError) as info:
        BackendConfig(**{field: value})
    assert repr(value) in str(info.value) and allowed in str(info.value)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dispatcher_num_sms": 0},
        {"dispatcher_num_sms": True},
        {"fake_gate_noise": 1.5},
        {"compile_attn": "yes"},
        {"rope_fusion": 1},
        {"te_fp8": "current"},
        {"gate_precision": "int8"},
        {"gate_precision": torch.int32},
    ],
)
def test_invalid_values(kwargs):
    with pytest.raises(ValueError):
        BackendConfig(**kwargs)


def test_gate_precision_names():
    assert BackendConfig(gate_precision="torch.float32").gate_precision is torch.float32
    assert BackendConfig(gate_precision="bf16").gate_precision is torch.bfloat16
    with pytest.raises(ValueError, match="expected one of"):
        dtype_from_str("f32")


def test_te_choices_without_te_raise_importerror_with_install_line():
    for kwargs in ({"linear": "te"}, {"attn": "te"}, {"rms_norm": "te"}, {"rope_fusion": True}):
        with pytest.raises(ImportError, match=r"am-precision\[te\]"):
            BackendConfig(**kwargs)


def test_fp8_needs_a_te_backend():
    with pytest.raises(ValueError, match="linear='te' or experts='te'"):
        BackendConfig(te_fp8=TEFp8Config())


def test_grouped_experts_without_ep_dispatcher_fall_back_with_reason():
    cfg = BackendConfig(experts="gmm", dispatcher="torch")
    assert (cfg.experts, cfg.dispatcher) == ("torch_mm", "torch")
    assert len(cfg.fallback_reasons) == 1 and "experts='gmm'" in cfg.fallback_reasons[0]
    assert BackendConfig(experts="gmm", dispatcher="deepep").experts == "gmm"


def test_deprecated_enable_deepep():
    with pytest.warns(DeprecationWarning, match="enable_deepep"):
        cfg = BackendConfig(enable_deepep=True)
    assert (cfg.experts, cfg.dispatcher, cfg.enable_deepep) == ("gmm", "deepep", None)
    with pytest.warns(DeprecationWarning):
        cfg = BackendConfig(enable_deepep=False, dispatcher="deepep")
    assert cfg.dispatcher == "torch"


def test_fp8_config_without_te_is_a_noop():
    cfg = TEFp8Config(recipe="block")
    assert cfg.build_recipe() is None
    with cfg.maybe_te_autocast():
        pass
    with pytest.raises(ValueError, match=r"\['current', 'block', 'mxfp8'\]"):
        TEFp8Config(recipe="delayed")


def test_te_configs_with_fake_te(fake_te):
    cfg = BackendConfig(linear="te", rms_norm="te", te_fp8={"recipe": "mxfp8"})
    assert isinstance(cfg.te_fp8, TEFp8Config) and cfg.uses_te
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recipe = cfg.te_fp8.build_recipe()
    assert type(recipe) is fake_te.recipes.MXFP8BlockScaling
    assert type(TEFp8Config().build_recipe()) is fake_te.recipes.Float8CurrentScaling
    assert type(TEFp8Config(recipe="block").build_recipe()) is fake_te.recipes.Float8BlockScaling
    prebuilt = fake_te.recipes.DelayedScaling()
    assert TEFp8Config(recipe=prebuilt).build_recipe() is prebuilt
    with TEFp8Config(recipe="block").maybe_te_autocast():
        pass
    enabled, recipe = fake_te.calls["autocast"][-1]
    assert enabled is True and type(recipe) is fake_te.recipes.Float8BlockScaling


def test_old_te_without_autocast_uses_fp8_autocast(fake_te, monkeypatch):
    seen = []
    monkeypatch.delattr(fake_te.te, "autocast")
    monkeypatch.setattr(
        fake_te.te,
        "fp8_autocast",
        lambda **kw: seen.append(kw) or __import__("contextlib").nullcontext(),
        raising=False,
    )
    with TEFp8Config().maybe_te_autocast():
        pass
    assert (
        seen and seen[0]["enabled"] is True and type(seen[0]["fp8_recipe"]).__name__ == "Float8CurrentScaling"
    )


def test_mxfp8_on_old_te_raises(fake_te, monkeypatch):
    monkeypatch.delattr(fake_te.recipes, "MXFP8BlockScaling")
    with pytest.raises(ImportError, match="MXFP8BlockScaling"):
        TEFp8Config(recipe="mxfp8").build_recipe()
