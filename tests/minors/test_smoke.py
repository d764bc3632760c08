"""One exactness check per package on tiny Llama and Qwen3: the smoke the `minors` nox session runs on
every published transformers 5.x minor (beside tests/contracts).

Each test is named `test_am_<package>` so that the session can tell which package a failure belongs to.
Every comparison is against a reference computed another way (each document alone, the plain model, the
unsplit model) in fp32, with the integration suite's tolerances (tests/integration/integration_stack.py).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "integration"))

import integration_stack as stack
from liger_expectations import check_liger_report_and_undo

from am_attention import (
    ReferenceDotProductAttention,
    get_te_attention_stats,
    inject_te_attention,
    reset_te_attention_stats,
)
from am_cli.tiny_models import build_model
from am_packing import configure_packing, pack_sequences
from am_pipelining import split_model_into_stages
from am_precision import cast_model_to_dtype

ARCHS = ("llama", "qwen3")
# bf16 logits of a 4-layer tiny model vs its fp32 original: bf16 keeps 8 mantissa bits (relative rounding
# 2^-9 per op); with values of order 1 after a few layers, 5e-2 absolute covers the accumulated rounding.
BF16_LOGITS_ATOL = 5e-2


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    torch.set_num_threads(1)


def _model(arch: str) -> torch.nn.Module:
    return build_model(stack.stack_config(arch), seed=0)


def _batch(arch: str) -> dict[str, torch.Tensor]:
    config = stack.stack_config(arch)
    return pack_sequences([d.tolist() for d in stack.documents(config)], stack.MAX_LENGTH)


def _loss(model: torch.nn.Module, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return model.loss_function(logits=logits, labels=labels, vocab_size=logits.shape[-1])


@pytest.mark.parametrize("arch", ARCHS)
def test_am_packing(arch: str) -> None:
    """A packed training step (sdpa) equals each document run alone: logits, loss and gradients."""
    reference = _model(arch)
    model = copy.deepcopy(reference)
    batch = _batch(arch)
    ref_loss, ref_logits = stack.per_document_reference(reference, batch)
    ref_loss.backward()
    with configure_packing("sdpa"):
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        )
        loss = _loss(model, out.logits, batch["labels"])
        loss.backward()
    real = batch["attention_mask"] > 0
    torch.testing.assert_close(out.logits[real], ref_logits[real], atol=stack.LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=stack.LOSS_ATOL, rtol=0)
    stack.assert_stage_grads_match([model], reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_am_attention(arch: str) -> None:
    """TE injection (SDPA reference kernel) gives the plain model's logits; every layer ran the kernel."""
    reference = _model(arch)
    model = copy.deepcopy(reference)
    ids = _batch(arch)["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        reset_te_attention_stats()
        with inject_te_attention(model, dot_product_attention_cls=ReferenceDotProductAttention):
            got = model(input_ids=ids, use_cache=False).logits
        stats = get_te_attention_stats()
    layers = stack.text_config(reference.config).num_hidden_layers
    assert stats["te_hits"] + stats.get("te_thd_hits", 0) == layers, stats
    torch.testing.assert_close(got, expected, atol=stack.LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_am_pipelining(arch: str) -> None:
    """Two stages chained in one process give the unsplit model's logits, loss and gradients."""
    reference = _model(arch)
    batch = _batch(arch)
    stages = split_model_into_stages(copy.deepcopy(reference), 2)
    kwargs = {"position_ids": batch["position_ids"]}
    logits = stages[1](stages[0](batch["input_ids"], **kwargs), **kwargs)
    loss = _loss(reference, logits, batch["labels"])
    loss.backward()
    ref = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False)
    ref_loss = _loss(reference, ref.logits, batch["labels"])
    ref_loss.backward()
    torch.testing.assert_close(logits, ref.logits, atol=stack.LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=stack.LOSS_ATOL, rtol=0)
    stack.assert_stage_grads_match(stages, reference)


@pytest.mark.parametrize("arch", ARCHS)
def test_am_kernels(arch: str) -> None:
    """The Liger patch replaces the expected modules, reports them, and its undo restores every object."""
    pytest.importorskip("liger_kernel", reason="am-kernels[liger] is not installed")
    model = _model(arch)
    ids = _batch(arch)["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
    check_liger_report_and_undo(model, arch)
    with torch.no_grad():
        after = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("arch", ARCHS)
def test_am_precision(arch: str) -> None:
    """A bf16 cast keeps exactly the `_keep_in_fp32_modules_strict` segments fp32 (`norm` is the final norm,
    not `input_layernorm` or `q_norm`), values untouched; a plain bf16 cast runs within bf16 tolerance."""
    reference = _model(arch)
    pinned = copy.deepcopy(reference)
    pinned._keep_in_fp32_modules_strict = ["norm"]
    cast_model_to_dtype(pinned, torch.bfloat16)
    kept = sorted(n for n, p in pinned.named_parameters() if p.dtype == torch.float32)
    assert kept == ["model.norm.weight"], kept
    assert torch.equal(pinned.model.norm.weight, reference.model.norm.weight)
    assert {p.dtype for n, p in pinned.named_parameters() if n not in kept} == {torch.bfloat16}
    model = copy.deepcopy(reference)
    cast_model_to_dtype(model, torch.bfloat16)
    ids = _batch(arch)["input_ids"]
    with torch.no_grad():
        expected = reference(input_ids=ids, use_cache=False).logits
        got = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(got.float(), expected, atol=BF16_LOGITS_ATOL, rtol=0)
