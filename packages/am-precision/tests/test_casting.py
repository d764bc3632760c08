import re

import pytest
import torch
from torch import nn

from am_precision import cast_frozen_modules_to_compute_dtype, cast_model_to_dtype, yield_fp32_model


def _segment_regex(keywords):
    # Independent reference for the rule: transformers 4.x's `(^|\.)kw($|\.)` pattern.
    return re.compile("|".join(rf"(^|\.){re.escape(k)}($|\.)" for k in keywords))


def _expected_fp32(model, keywords):
    rx = _segment_regex(keywords)
    return {n for n, _ in model.named_parameters() if rx.search(n)}


def test_t5_keeps_exactly_wo_in_fp32(tiny_t5):
    model = tiny_t5()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_model_to_dtype(model, torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, ["wo"])
    assert fp32 and all(".wo." in n for n in fp32)
    assert all(p.dtype == torch.bfloat16 for n, p in model.named_parameters() if n not in fp32)
    for n in fp32:
        assert torch.equal(dict(model.named_parameters())[n], before[n])


def test_llama_subclass_keeps_declared_modules_only(keep_llama):
    model = keep_llama()
    with torch.no_grad():  # non-trivial values so that a bf16 round trip would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_model_to_dtype(model, torch.bfloat16)
    params = dict(model.named_parameters())
    fp32 = {n for n, p in params.items() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, ["norm", "input_layernorm", "mlp.gate_proj"])
    assert "model.norm.weight" in fp32 and "model.layers.0.input_layernorm.weight" in fp32
    assert "model.layers.0.post_attention_layernorm.weight" not in fp32  # "norm" is not a substring rule
    assert all(params[n].dtype == torch.bfloat16 for n in params.keys() - fp32)
    for n in fp32:  # restored bit for bit, not round-tripped through bf16
        assert torch.equal(params[n], before[n]), n
    for n in params.keys() - fp32:
        assert torch.equal(params[n], before[n].to(torch.bfloat16)), n


def test_t5_runs_after_cast(tiny_t5):
    # T5 casts activations to `wo.weight.dtype`, so its forward must work with wo kept in fp32.
    model = tiny_t5()
    cast_model_to_dtype(model, torch.bfloat16)
    ids = torch.randint(0, 64, (1, 6))
    out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_meta_model_casts(keep_llama):
    with torch.device("meta"):
        model = keep_llama()
    cast_model_to_dtype(model, torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, ["norm", "input_layernorm", "mlp.gate_proj"])
    assert all(p.is_meta for p in model.parameters())


class _WithBuffers(nn.Module):
    _keep_in_fp32_modules = ["norm"]  # noqa: RUF012

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)
        self.norm.register_buffer("stat", torch.full((8,), 1 / 3))
        self.norm.register_buffer("steps", torch.arange(3))
        self.proj = nn.Linear(8, 8)
        self.register_buffer("normish", torch.full((2,), 1 / 3))
        self.holder = nn.Linear(8, 8)


def test_buffers_and_integer_tensors():
    m = _WithBuffers()
    cast_model_to_dtype(m, torch.float16)
    assert m.norm.stat.dtype == torch.float32 and torch.equal(m.norm.stat, torch.full((8,), 1 / 3))
    assert m.norm.steps.dtype == torch.int64
    assert m.normish.dtype == torch.float16
    assert m.proj.weight.dtype == torch.float16


def test_skip_modules_left_untouched_and_order_kept():
    m = _WithBuffers()
    order = [n for n, _ in m.named_parameters()]
    cast_model_to_dtype(m, torch.bfloat16, skip_modules=("holder",))
    assert m.holder.weight.dtype == torch.float32 and m.proj.weight.dtype == torch.bfloat16
    assert [n for n, _ in m.named_parameters()] == order
    with pytest.raises(ValueError, match=r"\['nope'\].*expected some of"):
        cast_model_to_dtype(m, torch.bfloat16, skip_modules=("nope",))
    with pytest.raises(TypeError):
        cast_model_to_dtype(m, torch.bfloat16, skip_modules="holder")


def test_bad_dtype():
    with pytest.raises(TypeError, match=r"floating torch\.dtype"):
        cast_model_to_dtype(nn.Linear(2, 2), torch.int8)


def test_yield_fp32_model_round_trip_is_exact(keep_llama):
    model = keep_llama()
    cast_model_to_dtype(model, torch.bfloat16)
    before = {n: (p.dtype, p.detach().clone()) for n, p in model.named_parameters()}
    with yield_fp32_model(model) as inner:
        assert inner is model
        assert all(p.dtype == torch.float32 for p in model.parameters())
    after = dict(model.named_parameters())
    for n, (dtype, value) in before.items():
        assert after[n].dtype == dtype and torch.equal(after[n], value), n


def test_yield_fp32_model_samples_in_fp32_and_restores_on_error():
    model = nn.Sequential(nn.Linear(16, 16)).to(torch.bfloat16)
    with yield_fp32_model(model):
        torch.manual_seed(1)
        nn.init.normal_(model[0].weight, std=0.02)
    torch.manual_seed(1)
    ref = torch.empty(16, 16).normal_(std=0.02).to(torch.bfloat16)
    assert model[0].weight.dtype == torch.bfloat16 and torch.equal(model[0].weight, ref)
    with pytest.raises(RuntimeError, match="boom"), yield_fp32_model(model, torch.float16):
        raise RuntimeError("boom")
    assert model[0].weight.dtype == torch.float16


class _Tower(nn.Module):
    _keep_in_fp32_modules = ["keep"]  # noqa: RUF012

    def __init__(self):
        super().__init__()
        self.vision = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
        self.vision.register_buffer("mean", torch.full((4,), 1 / 3))
        self.keep = nn.Linear(4, 4)
        self.text = nn.Linear(4, 4)
        self.rotary = nn.Module()
        self.rotary.register_buffer("inv_freq", torch.full((2,), 1 / 3))


def test_cast_frozen_modules():
    m = _Tower()
    for p in [*m.vision.parameters(), *m.keep.parameters()]:
        p.requires_grad_(False)
    cast_frozen_modules_to_compute_dtype(m, torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in m.vision.parameters())
    assert m.vision.mean.dtype == torch.bfloat16
    assert m.keep.weight.dtype == torch.float32  # frozen but kept by keyword
    assert m.text.weight.dtype == torch.float32  # trainable
    assert m.rotary.inv_freq.dtype == torch.float32  # no parameters: not a frozen module
    cast_frozen_modules_to_compute_dtype(m, None)  # no-op
    x = torch.randn(2, 4, dtype=torch.bfloat16)
    assert m.vision(x).dtype == torch.bfloat16
