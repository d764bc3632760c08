"""Shared pieces of the integration tests: architectures, packed documents, the reference loss, tolerances."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import transformers

from am_cli.tiny_models import TINY_ARCHS, build_config

IGNORE_INDEX = -100
# Six documents in two packed rows of 26 tokens (FFD: [13, 11] + 2 padding, [9, 7, 5, 3] + 2 padding).
# Three are longer than the tiny models' sliding window (8), so windowed layers differ from full ones.
DOC_LENGTHS = (13, 11, 9, 7, 5, 3)
MAX_LENGTH = 26
SLIDING_WINDOW = 8

# fp32 logits of a packed row vs each document alone: same ops, other summation order/blocking.
LOGITS_ATOL = 1e-5
# fp32 loss: one scalar from the same per-token terms summed in another order.
LOSS_ATOL = 1e-5
# fp32 gradients: each element is a sum over tokens (and heads, layers) accumulated in another order by
# the packed path. The rounding error scales with the largest terms of that sum, i.e. with the tensor's
# largest gradient, not with the element itself: Gemma4's sqrt(hidden)-scaled embedding has gradients up
# to 1.6, and there even the fp32 per-document reference differs from an fp64 one by 8.5e-5. So the
# absolute tolerance grows with max|grad| of the tensor (1e-4 of it, ~1000 fp32 ulps) on top of 1e-5.
GRAD_ATOL = 1e-5
GRAD_RTOL = 1e-4

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]


def arch_params(names: Iterable[str] | None = None) -> list[Any]:
    """Every built-in tiny architecture; those the installed transformers lacks are skipped, with the reason."""
    params = []
    for name in names if names is not None else TINY_ARCHS:
        arch = TINY_ARCHS[name]
        marks = []
        if not arch.available():
            marks.append(
                pytest.mark.skip(
                    reason=f"transformers {transformers.__version__} has no transformers.models.{arch.requires}"
                )
            )
        params.append(pytest.param(name, marks=marks, id=name))
    return params


def stack_config(arch: str) -> Any:
    """The built-in config, pipelinable: Gemma4's per-layer inputs exist on stage 0 only, so turn them off."""
    config = build_config(arch)
    if arch == "gemma4":
        # am_pipelining.get_pipeline_problems names this setting; layers, windows and scaling stay Gemma4's.
        config.hidden_size_per_layer_input = 0
    return config


def text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def documents(config: Any, lengths: tuple[int, ...] = DOC_LENGTHS, seed: int = 0) -> list[torch.Tensor]:
    """Random token documents that avoid the special ids (pad/bos/eos and the VLM placeholder ids at the top)."""
    vocab = text_config(config).vocab_size
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab - 8, (n,), generator=generator) for n in lengths]


def per_document_reference(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each packed document run alone through `model`: (loss, logits laid out like the packed rows).

    The loss is next-token CE summed over every predicted token and divided by their count. Alone, a
    document of n tokens predicts tokens 1..n-1 (n-1 terms); the packed labels put -100 on each document's
    first token and on padding and the loss shifts labels by one, so the packed mean runs over exactly these
    sum(n-1) (position, target) pairs. Padding slots of the returned logits stay 0.
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    total = torch.zeros((), device=ids.device)
    count = 0
    layout: torch.Tensor | None = None
    for row in range(ids.shape[0]):
        for doc_id in range(1, int(mask[row].max()) + 1):
            where = (mask[row] == doc_id).nonzero().flatten()
            doc = ids[row, where]
            logits = model(input_ids=doc[None], use_cache=False).logits[0]
            total = total + F.cross_entropy(logits[:-1].float(), doc[1:], reduction="sum")
            count += doc.numel() - 1
            if layout is None:
                layout = logits.new_zeros(*ids.shape, logits.shape[-1])
            layout[row, where] = logits.detach()
    assert layout is not None
    return total / count, layout


def predicted_tokens(labels: torch.Tensor) -> int:
    """Tokens the causal-LM loss scores: labels shifted left by one, -100 dropped."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def assert_close_grad(name: str, got: torch.Tensor | None, expected: torch.Tensor | None) -> None:
    if expected is None or got is None:
        assert got is None and expected is None, (
            f"{name}: gradient {'missing' if got is None else 'unexpected'} (reference has "
            f"{'none' if expected is None else 'one'})"
        )
        return
    atol = GRAD_ATOL + GRAD_RTOL * float(expected.abs().max())
    torch.testing.assert_close(got, expected, atol=atol, rtol=GRAD_RTOL, msg=lambda m: f"{name}: {m}")


def assert_stage_grads_match(stages: list[torch.nn.Module], reference: torch.nn.Module) -> None:
    """Every parameter is owned by exactly one stage (same name as unsplit) and its gradient matches."""
    ref_params = dict(reference.named_parameters())
    owner: dict[str, int] = {}
    for index, stage in enumerate(stages):
        for name, param in stage.named_parameters():
            assert name in ref_params, f"stage {index} has {name}, which the unsplit model does not"
            assert name not in owner, f"{name} is on stages {owner[name]} and {index}"
            owner[name] = index
            assert_close_grad(name, param.grad, ref_params[name].grad)
    missing = sorted(n for n in ref_params if n not in owner)
    assert not missing, f"parameters on no stage: {missing}"
