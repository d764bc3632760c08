"""Our TE patch logic, exercised on CPU through the FAKE transformer_engine from conftest.py."""

import pytest
import torch

import am_precision
from am_precision import initialize_linear_module, initialize_rms_norm_module, is_tensor_unallocated
from am_precision._patch import patch_name


def test_is_tensor_unallocated():
    assert is_tensor_unallocated(torch.empty(2, 3, device="meta"))
    assert is_tensor_unallocated(torch.empty(0, 3))
    assert not is_tensor_unallocated(torch.zeros(2, 3))
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = torch.empty(2, 3)
    assert is_tensor_unallocated(fake)


def test_initializers_without_te_raise_with_install_line():
    with pytest.raises(ImportError, match=r"am-precision\[te\]"):
        initialize_linear_module("te", 4, 4)
    with pytest.raises(ImportError, match=r"am-precision\[te\]"):
        initialize_rms_norm_module("te", 4)
    assert not am_precision.te_lazy._default_patcher.applied


def test_te_linear_gets_flag_and_short_circuits_meta(fake_te):
    lin = initialize_linear_module("te", 8, 6, bias=True, device="cpu", dtype=torch.float32)
    assert (
        isinstance(lin, fake_te.te.Linear)
        and patch_name(fake_te.te.Linear.forward) == "am_precision.te_linear_forward"
    )
    x = torch.randn(2, 8)
    am_precision.set_is_first_microbatch(True)
    y = lin(x)
    am_precision.set_is_first_microbatch(False)
    lin(x)
    lin(x, is_first_microbatch=True)  # an explicit argument wins over the flag
    assert fake_te.calls["linear"] == [True, False, True]
    torch.testing.assert_close(y, torch.nn.functional.linear(x, lin.weight, lin.bias))
    out = lin(torch.empty(3, 5, 8, device="meta"))
    assert out.shape == (3, 5, 6) and out.is_meta and len(fake_te.calls["linear"]) == 3
    am_precision.set_is_first_microbatch(None)
    am_precision.unpatch_te_modules()
    assert patch_name(fake_te.te.Linear.forward) is None


def test_te_rms_norm_and_grouped(fake_te):
    norm = initialize_rms_norm_module("te", 8, eps=1e-6, device="cpu", dtype=torch.float32)
    assert isinstance(norm, fake_te.te.RMSNorm)
    assert norm(torch.empty(2, 8, device="meta")).is_meta
    x = torch.randn(2, 8)
    torch.testing.assert_close(norm(x), x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))
    am_precision.set_is_first_microbatch(False)
    fake_te.te.GroupedLinear()(x, [1, 1])
    assert fake_te.calls["grouped"] == [False]
    am_precision.set_is_first_microbatch(None)
    am_precision.unpatch_te_modules()
    assert "forward" not in vars(fake_te.te.RMSNorm)  # inherited forward: revert deletes our entry


def test_patcher_imports_once(fake_te):
    loads = []

    def loader():
        loads.append(1)
        return fake_te.te

    patcher = am_precision.make_lazy_te_patcher(loader)
    assert loads == []  # lazy: nothing imported until the first call
    handle = patcher()
    assert patcher() is handle and loads == [1] and patcher.applied
    patcher.revert()
    assert not patcher.applied and patch_name(fake_te.te.Linear.forward) is None


def test_other_backends():
    assert type(initialize_linear_module("torch", 4, 3, dtype=torch.float32)) is torch.nn.Linear
    assert type(initialize_rms_norm_module("torch", 4)) is torch.nn.RMSNorm
    assert type(initialize_rms_norm_module("torch_fp32", 4)) is am_precision.Float32RMSNorm
    with pytest.raises(ValueError, match=r"\['torch', 'te'\]"):
        initialize_linear_module("apex", 4, 4)
    with pytest.raises(ValueError, match=r"\['torch', 'torch_fp32', 'te'\]"):
        initialize_rms_norm_module("fused", 4)
