"""am-precision on a GPU with the real transformer-engine: TE backends via BackendConfig, FP8 recipes."""

from __future__ import annotations

import importlib.util

import pytest
import torch

pytestmark = pytest.mark.gpu

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_te = pytest.mark.skipif(
    importlib.util.find_spec("transformer_engine") is None, reason="transformer-engine is not installed"
)


@pytest.fixture(autouse=True)
def _unpatch():
    yield
    from am_precision import set_is_first_microbatch, unpatch_te_modules

    unpatch_te_modules()
    set_is_first_microbatch(None)


@requires_cuda
def test_float32_rms_norm_compiled_on_cuda():
    from am_precision import Float32RMSNorm, float32_rms_norm

    norm = Float32RMSNorm(1024, eps=1e-6, device="cuda")
    x = torch.randn(256, 1024, device="cuda", dtype=torch.bfloat16) * 3
    assert norm.runs_compiled()
    torch.testing.assert_close(norm(x), float32_rms_norm(x, norm.weight, 1e-6), rtol=2 * 2**-8, atol=1e-5)


@requires_cuda
@requires_te
def test_te_backends_match_torch():
    import transformer_engine.pytorch as te

    from am_precision import BackendConfig, initialize_linear_module, initialize_rms_norm_module
    from am_precision._patch import patch_name

    cfg = BackendConfig(linear="te", rms_norm="te", attn="sdpa")
    lin = initialize_linear_module(cfg.linear, 256, 512, bias=True, device="cuda", dtype=torch.bfloat16)
    norm = initialize_rms_norm_module(cfg.rms_norm, 256, eps=1e-6, device="cuda", dtype=torch.bfloat16)
    assert isinstance(lin, te.Linear) and isinstance(norm, te.RMSNorm)
    assert patch_name(te.Linear.forward) == "am_precision.te_linear_forward"
    x = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16)
    ref_lin = torch.nn.functional.linear(x.float(), lin.weight.float(), lin.bias.float())
    torch.testing.assert_close(lin(x).float(), ref_lin, rtol=2e-2, atol=2e-2)
    ref_norm = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float()
    torch.testing.assert_close(norm(x).float(), ref_norm, rtol=2e-2, atol=2e-2)
    # Unallocated inputs short-circuit (pipeline shape inference).
    assert lin(torch.empty(3, 256, device="meta", dtype=torch.bfloat16)).shape == (3, 512)


@requires_cuda
@requires_te
@pytest.mark.parametrize("recipe", ["current", "block", "mxfp8"])
def test_fp8_recipes_under_te_autocast(recipe):
    import transformer_engine.pytorch as te

    from am_precision import BackendConfig, TEFp8Config, initialize_linear_module, set_is_first_microbatch

    available = {
        "current": te.is_fp8_available,
        "block": getattr(te, "is_fp8_block_scaling_available", None),
        "mxfp8": getattr(te, "is_mxfp8_available", None),
    }[recipe]
    if available is None:
        pytest.skip(f"this transformer-engine has no availability check for {recipe}")
    ok = available()
    ok, reason = ok if isinstance(ok, tuple) else (ok, "")
    if not ok:
        pytest.skip(f"{recipe} FP8 not supported on this GPU: {reason}")
    cfg = BackendConfig(linear="te", attn="sdpa", te_fp8=TEFp8Config(recipe=recipe))
    lin = initialize_linear_module(cfg.linear, 256, 256, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(128, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    ref = torch.nn.functional.linear(x.float(), lin.weight.float())
    for first in (True, False):  # FP8 weight caching across microbatches through our flag
        set_is_first_microbatch(first)
        with cfg.te_fp8.maybe_te_autocast():
            y = lin(x)
        y.float().sum().backward()
    assert torch.isfinite(x.grad).all()
    # FP8 e4m3 keeps ~3 mantissa bits: a relative error of a few percent on a 256-long dot product.
    rel = (y.float() - ref).norm() / ref.norm()
    assert rel < 0.1, f"{recipe}: relative error {rel:.3f}"
