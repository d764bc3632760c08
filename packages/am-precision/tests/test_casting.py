import re

import pytest
import torch
from torch import nn

from am_precision import (
    cast_frozen_modules_to_compute_dtype,
    cast_model_to_dtype,
    get_fp32_module_keywords,
    yield_fp32_model,
)


def _segment_regex(keywords):
    # Independent reference for the rule: transformers 4.x's `(^|\.)kw($|\.)` pattern.
    return re.compile("|".join(rf"(^|\.){re.escape(k)}($|\.)" for k in keywords))


def _expected_fp32(model, keywords):
    rx = _segment_regex(keywords)
    return {n for n, _ in model.named_parameters() if rx.search(n)}


def test_t5_keeps_exactly_wo_in_fp32_for_fp16(tiny_t5):
    # T5 declares `_keep_in_fp32_modules = ["wo"]` (non-strict: against fp16 overflow).
    model = tiny_t5()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_model_to_dtype(model, torch.float16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, ["wo"])
    assert fp32 and all(".wo." in n for n in fp32)
    assert all(p.dtype == torch.float16 for n, p in model.named_parameters() if n not in fp32)
    for n in fp32:
        assert torch.equal(dict(model.named_parameters())[n], before[n])


def test_t5_bf16_keeps_nothing_as_transformers_does(tiny_t5):
    # transformers applies the non-strict list to float16 only: a bf16 T5 has wo in bf16.
    model = tiny_t5()
    cast_model_to_dtype(model, torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_llama_subclass_keeps_declared_modules_only(keep_llama):
    model = keep_llama()
    with torch.no_grad():  # non-trivial values so that a bf16 round trip would show
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_model_to_dtype(model, torch.float16)
    params = dict(model.named_parameters())
    fp32 = {n for n, p in params.items() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, ["norm", "input_layernorm", "mlp.gate_proj"])
    assert "model.norm.weight" in fp32 and "model.layers.0.input_layernorm.weight" in fp32
    assert "model.layers.0.post_attention_layernorm.weight" not in fp32  # "norm" is not a substring rule
    assert all(params[n].dtype == torch.float16 for n in params.keys() - fp32)
    for n in fp32:  # restored bit for bit, not round-tripped through fp16
        assert torch.equal(params[n], before[n]), n
    for n in params.keys() - fp32:
        assert torch.equal(params[n], before[n].to(torch.float16)), n


def test_bf16_keeps_only_the_strict_list(keep_llama):
    model = keep_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_model_to_dtype(model, torch.bfloat16)
    params = dict(model.named_parameters())
    fp32 = {n for n, p in params.items() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, ["input_layernorm", "mlp.gate_proj"])
    assert params["model.norm.weight"].dtype == torch.bfloat16  # non-strict: float16 only
    for n in fp32:
        assert torch.equal(params[n], before[n]), n


def test_fp64_target_keeps_nothing(keep_llama):
    model = keep_llama()
    cast_model_to_dtype(model, torch.float64)
    assert {p.dtype for p in model.parameters()} == {torch.float64}


def test_t5_runs_after_cast(tiny_t5):
    # T5 casts activations to `wo.weight.dtype`, so its forward must work with wo kept in fp32.
    model = tiny_t5()
    cast_model_to_dtype(model, torch.float16)
    assert model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    ids = torch.randint(0, 64, (1, 6))
    out = model(input_ids=ids, decoder_input_ids=ids).logits
    assert out.dtype == torch.float16 and torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    ("dtype", "keywords"),
    [
        (torch.float16, ["norm", "input_layernorm", "mlp.gate_proj"]),
        (torch.bfloat16, ["input_layernorm", "mlp.gate_proj"]),
    ],
)
def test_meta_model_casts(keep_llama, dtype, keywords):
    with torch.device("meta"):
        model = keep_llama()
    cast_model_to_dtype(model, dtype)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, keywords)
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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_yield_fp32_model_round_trip_is_exact(keep_llama, dtype):
    model = keep_llama()
    cast_model_to_dtype(model, dtype)
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
    cast_frozen_modules_to_compute_dtype(m, torch.float16)
    assert all(p.dtype == torch.float16 for p in m.vision.parameters())
    assert m.vision.mean.dtype == torch.float16
    assert m.keep.weight.dtype == torch.float32  # frozen but kept by keyword (non-strict: float16)
    assert m.text.weight.dtype == torch.float32  # trainable
    assert m.rotary.inv_freq.dtype == torch.float32  # no parameters: not a frozen module
    cast_frozen_modules_to_compute_dtype(m, None)  # no-op
    x = torch.randn(2, 4, dtype=torch.float16)
    assert m.vision(x).dtype == torch.float16


def test_cast_frozen_modules_bf16_applies_only_strict_keywords():
    m = _Tower()
    m._keep_in_fp32_modules_strict = ["vision.1"]
    for p in [*m.vision.parameters(), *m.keep.parameters()]:
        p.requires_grad_(False)
    cast_frozen_modules_to_compute_dtype(m, torch.bfloat16)
    assert m.keep.weight.dtype == torch.bfloat16  # non-strict keyword: float16 only
    assert m.vision[1].weight.dtype == torch.float32 and m.vision[0].weight.dtype == torch.bfloat16


class _CastsToItsOwnDtype(nn.Module):
    """Like glm_moe_dsa's indexer: a non-strict fp32 module fed activations of the model dtype."""

    _keep_in_fp32_modules = ["proj"]  # noqa: RUF012
    _keep_in_fp32_modules_strict = ["gate"]  # noqa: RUF012

    def __init__(self):
        super().__init__()
        self.inp, self.proj, self.gate = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 1)

    def forward(self, x):
        h = self.inp(x)
        return self.proj(h) * self.gate(h.float()).to(h.dtype)  # the strict module gets fp32 on purpose


def test_bf16_forward_runs_when_a_non_strict_module_takes_model_dtype_activations():
    m = _CastsToItsOwnDtype()
    cast_model_to_dtype(m, torch.bfloat16)
    assert m.proj.weight.dtype == torch.bfloat16 and m.gate.weight.dtype == torch.float32
    assert m(torch.randn(2, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16
    m = _CastsToItsOwnDtype()
    cast_model_to_dtype(m, torch.float16)  # float16: the non-strict list applies, as in transformers
    assert m.proj.weight.dtype == torch.float32 and m.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("model_type", ["glm_moe_dsa", "deepseek_v4"])
def test_bf16_models_declaring_a_non_strict_list_still_run(model_type, tiny_causal_lm):
    """transformers' glm_moe_dsa / deepseek_v4 declare `_keep_in_fp32_modules`; keeping those fp32 in a bf16
    model made the forward fail with a dtype mismatch. Only the strict list stays fp32 (transformers' rule)."""
    model = tiny_causal_lm(model_type)
    assert get_fp32_module_keywords(model, dtype=torch.float16) != get_fp32_module_keywords(
        model, dtype=torch.bfloat16
    ), "the model no longer declares a non-strict list: this test checks nothing"
    ids = torch.randint(0, 128, (1, 12))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    cast_model_to_dtype(model, torch.bfloat16)
    strict = get_fp32_module_keywords(model, dtype=torch.bfloat16)
    fp32 = {n for n, p in model.named_parameters() if p.dtype == torch.float32}
    assert fp32 == _expected_fp32(model, strict)
    with torch.no_grad():
        out = model(input_ids=ids).logits
    assert torch.isfinite(out.float()).all()
    # bf16 weights and activations through 2 layers: logits of this size (|ref| < 1) move by < 0.1.
    assert (out.float() - ref.float()).abs().max() < 0.1
