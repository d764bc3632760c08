"""ReferenceTELinear against plain torch: exact F.linear outside FP8 autocast, e4m3 rounding inside."""

import pytest
import torch
import torch.nn.functional as F

from am_precision import ReferenceTELinear, reference_fp8_autocast


def test_outside_autocast_it_is_f_linear():
    lin = ReferenceTELinear(16, 32, bias=True, params_dtype=torch.float32, device="cpu")
    with torch.no_grad():
        lin.bias.normal_()
    x = torch.randn(3, 5, 16)
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert lin(x, is_first_microbatch=True).shape == (3, 5, 32)


def test_inside_autocast_it_rounds_through_e4m3_with_current_scaling():
    lin = ReferenceTELinear(64, 32, bias=False, params_dtype=torch.float32, device="cpu")
    x = torch.randn(8, 64, requires_grad=True)
    exact = F.linear(x, lin.weight)

    def rounded(t):  # per-tensor current scaling: amax maps to e4m3's 448
        scale = 448.0 / t.abs().amax()
        return (t * scale).to(torch.float8_e4m3fn).float() / scale

    with reference_fp8_autocast(recipe="current"):
        out = lin(x)
    torch.testing.assert_close(out, F.linear(rounded(x.detach()), rounded(lin.weight.detach())))
    assert not torch.equal(out, exact)
    # e4m3 keeps 3 mantissa bits: each factor is within 2^-4 relative, a 64-term dot product much closer.
    torch.testing.assert_close(out, exact, rtol=0.1, atol=0.05)
    out.sum().backward()  # straight-through gradients reach input and weight
    # dgrad uses the FP8 weight, as TE does
    torch.testing.assert_close(x.grad, rounded(lin.weight.detach()).sum(0).expand_as(x), rtol=0, atol=1e-6)
    assert lin.weight.grad is not None


def test_state_dict_layout_follows_te():
    lin = ReferenceTELinear(16, 16, bias=False, params_dtype=torch.bfloat16, device="cpu")
    assert set(lin.state_dict()) == {"weight", "_extra_state"} and lin.weight.dtype == torch.bfloat16
    assert lin.state_dict()["_extra_state"].dtype == torch.uint8
    with_bias = ReferenceTELinear(16, 16, params_dtype=torch.float32, device="cpu")
    assert set(with_bias.state_dict()) == {"weight", "bias", "_extra_state"}
    with pytest.raises(ValueError, match="out_features must be a positive int"):
        ReferenceTELinear(16, 0, device="cpu")
