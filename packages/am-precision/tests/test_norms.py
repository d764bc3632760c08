import pytest
import torch

from am_precision import Float32RMSNorm, compile_unavailable_reason, float32_rms_norm

# bf16 has an 8-bit mantissa: one rounding of the output is at most 2**-8 relative; allow two ulps
# because the compiled kernel may reduce in a different order before that rounding.
BF16_RTOL = 2 * 2**-8


def _reference(x, w, eps, grad_out):
    """fp32 math from scratch, including autograd, then compared after the input-dtype cast."""
    x32 = x.detach().float().requires_grad_(True)
    w32 = w.detach().float().requires_grad_(True)
    y = w32 * (x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + eps))
    y.backward(grad_out.float())
    return y.detach(), x32.grad, w32.grad


def _check(norm, x, grad_out):
    x = x.clone().requires_grad_(True)
    y = norm(x)
    y.backward(grad_out)
    ref_y, ref_gx, ref_gw = _reference(x, norm.weight, norm.eps, grad_out)
    assert y.dtype == x.dtype and x.grad.dtype == x.dtype and norm.weight.grad.dtype == norm.weight.dtype
    torch.testing.assert_close(y.float(), ref_y, rtol=BF16_RTOL, atol=1e-6)
    torch.testing.assert_close(
        x.grad.float(), ref_gx, rtol=BF16_RTOL, atol=BF16_RTOL * ref_gx.abs().max().item()
    )
    # The weight grad sums over 3*5 rows in fp32 before one bf16 rounding.
    torch.testing.assert_close(norm.weight.grad.float(), ref_gw, rtol=BF16_RTOL, atol=1e-5)


def _inputs(dim=64):
    x = (torch.randn(3, 5, dim) * 4).to(torch.bfloat16)
    g = torch.randn(3, 5, dim).to(torch.bfloat16)
    return x, g


def test_eager_matches_fp32_reference():
    norm = Float32RMSNorm(64, eps=1e-6, use_compile=False)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64).to(torch.bfloat16))
    _check(norm, *_inputs())


def test_bf16_nn_rmsnorm_is_measurably_worse():
    # The reason this module exists: computing in bf16 loses accuracy that fp32 keeps.
    x, _ = _inputs(256)
    ref, _, _ = _reference(x, torch.ones(256), 1e-6, torch.zeros_like(x))
    ours = Float32RMSNorm(256, eps=1e-6, use_compile=False)(x).float()
    bf16 = torch.nn.RMSNorm(256, eps=1e-6, dtype=torch.bfloat16)(x).float()
    assert (ours - ref).abs().max() <= (bf16 - ref).abs().max()


@pytest.mark.skipif(compile_unavailable_reason() is not None, reason="torch.compile unavailable here")
def test_compiled_matches_fp32_reference_and_eager():
    norm = Float32RMSNorm(64, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(64).to(torch.bfloat16))
    assert norm.runs_compiled()
    x, g = _inputs()
    _check(norm, x, g)
    # A different token count reuses the dynamic-shape graph and stays correct.
    x2, g2 = (torch.randn(7, 64) * 3).to(torch.bfloat16), torch.randn(7, 64).to(torch.bfloat16)
    norm.weight.grad = None
    _check(norm, x2, g2)
    eager = float32_rms_norm(x2, norm.weight, norm.eps)
    torch.testing.assert_close(norm(x2), eager, rtol=BF16_RTOL, atol=0)


def test_eager_fallback_when_compile_disabled(monkeypatch):
    monkeypatch.setenv("AM_PRECISION_DISABLE_COMPILE", "1")
    assert "AM_PRECISION_DISABLE_COMPILE" in compile_unavailable_reason()
    norm = Float32RMSNorm(64)
    assert not norm.runs_compiled()
    _check(norm, *_inputs())
    with pytest.raises(RuntimeError, match="use_compile=True"):
        Float32RMSNorm(64, use_compile=True)(torch.randn(2, 64))


def test_meta_and_validation():
    norm = Float32RMSNorm(8, device="meta")
    assert norm(torch.empty(2, 8, device="meta", dtype=torch.bfloat16)).is_meta
    norm = Float32RMSNorm(8, dtype=torch.float32)
    with torch.no_grad():
        norm.weight.fill_(3.0)
    norm.reset_parameters()
    assert torch.equal(norm.weight, torch.ones(8))
    with pytest.raises(ValueError, match="positive int"):
        Float32RMSNorm(0)
    with pytest.raises(ValueError, match="use_compile"):
        Float32RMSNorm(4, use_compile="yes")


@pytest.mark.skipif(compile_unavailable_reason() is not None, reason="torch.compile unavailable here")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_never_recompiles_for_a_new_shape(backend, monkeypatch):
    """Variable sequence lengths and batch sizes, a hidden norm (3D) and a per-head norm on a view (4D),
    train and no_grad steps: every output and gradient equals the fp32 reference, and once each kernel has
    seen its dynamic graph and the one-row graph, no new shape compiles anything."""
    from torch._dynamo.utils import counters

    from am_precision import norms

    # raising=False: the same test runs (and hit dynamo's recompile limit) before the backend knob existed.
    monkeypatch.setattr(norms, "_BACKEND", backend, raising=False)
    hidden = Float32RMSNorm(64, eps=1e-6)
    head = Float32RMSNorm(16, eps=1e-6, dtype=torch.float32)  # another width and another weight dtype
    with torch.no_grad():
        hidden.weight.copy_(torch.randn(64).to(torch.bfloat16))
        head.weight.copy_(torch.randn(16))
    proj = torch.nn.Linear(64, 64, dtype=torch.bfloat16)

    def step(batch, seq, train):
        x = (torch.randn(batch, seq, 64) * 3).to(torch.bfloat16).requires_grad_(train)
        with torch.set_grad_enabled(train):
            h = hidden(x)
            q = proj(h).view(batch, seq, 4, 16)  # a view whose base is 3D, as q_norm sees it
            out = head(q)
        torch.testing.assert_close(out, float32_rms_norm(q, head.weight, 1e-6), rtol=BF16_RTOL, atol=1e-6)
        if train:
            hidden.weight.grad = head.weight.grad = None
            g = torch.randn_like(out)
            out.backward(g)
            _, _, ref_gw = _reference(q, head.weight, 1e-6, g)
            torch.testing.assert_close(head.weight.grad, ref_gw, rtol=BF16_RTOL, atol=1e-4)
            assert x.grad is not None and torch.isfinite(x.grad.float()).all()

    before = counters["stats"]["unique_graphs"]
    for batch, seq, train in [(1, 1, True), (2, 3, True), (1, 7, False), (3, 5, True), (2, 1, False)]:
        step(batch, seq, train)
    warm = counters["stats"]["unique_graphs"]
    # Two (input, weight) dtype pairs x forward/backward kernels x (dynamic graph, one-row graph).
    assert warm - before <= 8
    for batch, seq, train in [(4, 9, True), (1, 23, True), (5, 2, False), (2, 31, True), (1, 12, False)]:
        step(batch, seq, train)
    assert counters["stats"]["unique_graphs"] == warm, "a new input shape recompiled"


def test_compiled_function_backward_matches_autograd_of_the_eager_math():
    """The closed-form backward of the compiled path against autograd through `float32_rms_norm`."""
    from am_precision import norms

    x = (torch.randn(4, 6, 32) * 2).requires_grad_(True)
    w = torch.randn(32, requires_grad=True)
    g = torch.randn(4, 6, 32)
    y_ref = float32_rms_norm(x, w, 1e-5)
    y_ref.backward(g)
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    x2, w2 = x.detach().reshape(-1, 32), w.detach()
    _, rstd = norms._forward_2d(x2, w2, 1e-5)
    fx, fw = norms._backward_2d(g.reshape(-1, 32), x2, w2, rstd)
    torch.testing.assert_close(fx.view_as(x), gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fw, gw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("eps", [-1, -1e-6, float("nan"), float("inf")])
def test_bad_eps_is_a_value_error_naming_eps(eps):
    with pytest.raises(ValueError, match="eps"):
        Float32RMSNorm(8, eps=eps)


@pytest.mark.parametrize("eps", ["1e-5", None, True, torch.tensor(1e-5)])
def test_non_numeric_eps_is_a_type_error_naming_eps(eps):
    with pytest.raises(TypeError, match="eps"):
        Float32RMSNorm(8, eps=eps)


def test_input_width_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        Float32RMSNorm(8, use_compile=False)(torch.randn(2, 4))
