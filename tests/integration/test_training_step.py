"""The whole stack on every built-in tiny architecture, one training step against a per-document reference.

The order and its reasons are written once, in the root README ("Composing the packages"). Stack: am_precision cast (fp32, so the comparison is strict) → am_kernels Liger patch
(CPU: patched, reported and reverted, because Liger's Triton kernels only execute on CUDA; CUDA: kept on
every stage) → am_pipelining split into 2 stages, chained in one process → am_attention TE injection with
the SDPA reference DotProductAttention → am_packing configured for "te" (the indexed mask passes through
to TE, which runs THD with per-document cu_seqlens) → forward, transformers' causal-LM loss, backward.

Reference (computed another way): the unpatched, unsplit model runs each document alone; the loss is
next-token cross entropy summed over every predicted token and divided by their count.
"""

from __future__ import annotations

import contextlib
import copy

import integration_stack as stack
import pytest
import torch
from liger_expectations import LIGER_OPTIONS, check_liger_report_and_undo

from am_attention import (
    ReferenceDotProductAttention,
    get_te_attention_stats,
    inject_te_attention,
    reset_te_attention_stats,
)
from am_cli.tiny_models import build_model
from am_kernels import get_patch_report, patch_liger_kernel, unpatch_liger_kernel
from am_packing import configure_packing, pack_sequences
from am_pipelining import split_model_into_stages
from am_precision import cast_model_to_dtype, get_fp32_parameter_names


@pytest.mark.parametrize("device", stack.DEVICES)
@pytest.mark.parametrize("arch", stack.arch_params())
def test_packed_pipelined_te_step_equals_per_document(arch: str, device: str) -> None:
    config = stack.stack_config(arch)
    reference = build_model(config, seed=0).to(device)
    model = copy.deepcopy(reference)
    vocab = stack.text_config(config).vocab_size
    batch = pack_sequences([d.tolist() for d in stack.documents(config)], stack.MAX_LENGTH)
    batch = {k: v.to(device) for k, v in batch.items()}
    # The batch is what the test claims: 2 rows, up to 4 documents per row, padding, one loss term per
    # predicted token of each document alone.
    assert tuple(batch["input_ids"].shape) == (2, stack.MAX_LENGTH)
    assert int(batch["attention_mask"].max()) == 4 and int((batch["attention_mask"] == 0).sum()) == 4
    assert stack.predicted_tokens(batch["labels"]) == sum(n - 1 for n in stack.DOC_LENGTHS)

    ref_loss, ref_logits = stack.per_document_reference(reference, batch)
    ref_loss.backward()
    real = batch["attention_mask"] > 0
    with torch.no_grad():  # control: the rows run without packing differ, so the comparison below can fail
        plain = reference(input_ids=batch["input_ids"], use_cache=False).logits
    assert (plain - ref_logits)[real].abs().max() > 1e-3

    # am-precision: nothing these models declare stays fp32 apart (bf16 is checked in test_precision.py);
    # the fp32 cast keeps every tensor and value.
    assert get_fp32_parameter_names(model) == []
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    cast_model_to_dtype(model, torch.float32)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32 and torch.equal(param, before[name]), name

    on_cuda = device == "cuda"
    if not on_cuda:
        # Liger's Triton kernels cannot execute on CPU: patch, check the report, revert before running.
        check_liger_report_and_undo(model, arch)

    stages = split_model_into_stages(model, 2)
    assert [s.lm_head is None for s in stages] == [True, False]
    with contextlib.ExitStack() as patches:
        for stage in stages:
            patches.enter_context(
                inject_te_attention(stage, dot_product_attention_cls=ReferenceDotProductAttention)
            )
            if on_cuda and arch in LIGER_OPTIONS:
                # Patched after the split: the pipeline forward owns each stage's top-level forward, so the
                # fused lm_head+CE stays off; norms, gated MLPs and RoPE run Liger's kernels.
                patch_liger_kernel(stage, fused_linear_cross_entropy=False)
                patches.callback(unpatch_liger_kernel, stage)
                assert get_patch_report(stage)
        patches.enter_context(configure_packing("te"))
        reset_te_attention_stats()
        kwargs = {"attention_mask": batch["attention_mask"], "position_ids": batch["position_ids"]}
        hidden = stages[0](batch["input_ids"], **kwargs)
        assert hidden.shape == (2, stack.MAX_LENGTH, stack.text_config(config).hidden_size)
        logits = stages[1](hidden, **kwargs)
        loss = reference.loss_function(logits=logits, labels=batch["labels"], vocab_size=vocab)
        loss.backward()
        te_stats = get_te_attention_stats()

    # Every decoder layer ran the injected kernel in THD (packed), none fell back to SDPA.
    layers = stack.text_config(config).num_hidden_layers
    assert te_stats["te_thd_hits"] == layers, te_stats
    assert sum(v for k, v in te_stats.items() if k.startswith("fallback_")) == 0, te_stats
    for stage in stages:  # Liger reverted on exit; only the pipeline forwards remain
        assert not [k for k in get_patch_report(stage).counts() if k.startswith("am_kernels.")]

    torch.testing.assert_close(logits[real], ref_logits[real], atol=stack.LOGITS_ATOL, rtol=0)
    torch.testing.assert_close(loss, ref_loss, atol=stack.LOSS_ATOL, rtol=0)
    stack.assert_stage_grads_match(stages, reference)
