"""Packed batch == each document alone: logits and parameter gradients, per backend (fp32 on CPU).

The reference runs every document on its own, unpacked and unmasked, through eager attention on a copy of
the same weights; the packed run uses the backend under test with `configure_packing`. fp32 with
head_dim 8 and <= 32 tokens: attention sums have <= 32 terms, so agreement to 1e-5 is expected and any
cross-document leak (or window error) shows up at >= 1e-2.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from am_packing import (
    backends,
    configure_packing,
    pack_sequences,
    register_varlen_attention,
)

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3"]


def _packed_inputs(batch):
    return dict(attention_mask=batch["attention_mask"], position_ids=batch["position_ids"], use_cache=False)


def _packed(exact, model, docs):
    """A packed batch of `docs` through `model`: (batch, logits, summed-loss gradients)."""
    batch = pack_sequences(docs, 32)
    return (batch, *exact.packed(model, batch, **_packed_inputs(batch)))


def _packed_logits(model, docs):
    batch = pack_sequences(docs, 32)
    return batch, model(input_ids=batch["input_ids"], **_packed_inputs(batch)).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_equals_per_document(make_model, exact, arch, impl):
    model = make_model(arch, impl)
    docs = exact.documents()
    ref_logits, ref_grads = exact.per_document(model, docs)
    with configure_packing(impl):
        batch, logits, grads = _packed(exact, model, docs)
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL
    exact.grads_close(ref_grads, grads)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_unpatched_packed_mask_leaks_across_documents(make_model, exact, arch):
    """The control: without configure_packing the same batch mixes documents, so the test above can fail."""
    model = make_model(arch, "sdpa")
    docs = exact.documents()
    with torch.no_grad():
        ref_logits = [model(input_ids=torch.tensor([d]), use_cache=False).logits[0] for d in docs]
        batch, logits = _packed_logits(model, docs)
    assert exact.worst(docs, batch, logits, ref_logits) > 1e-3


@pytest.mark.parametrize("arch", ARCHS)
def test_flex_attention_forward(make_model, exact, eager_flex, arch):
    """flex_attention logits; torch has no CPU backward for FlexAttention (gradients: tests/gpu)."""
    model = make_model(arch, "flex_attention")
    docs = exact.documents()
    with torch.no_grad():
        ref_logits, _ = exact.per_document(model, docs, with_grad=False)
        with configure_packing("flex_attention"):
            batch, logits = _packed_logits(model, docs)
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL


def _has_cpu_varlen_kernel() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return False
    q = torch.randn(4, 1, 8)
    cu = torch.tensor([0, 4], dtype=torch.int32)
    try:
        varlen_attn(q, q, q, cu, cu, 4, 4)
    except (NotImplementedError, RuntimeError):
        return False
    return True


@pytest.mark.skipif(
    not _has_cpu_varlen_kernel(),
    reason="torch provides no CPU kernel for varlen_attn (aten::_flash_attention_forward is CUDA-only); "
    "the real kernel is tested in tests/gpu/test_packing.py",
)
@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_torch_varlen_real_kernel(make_model, exact, arch):
    model = make_model(arch, "eager")
    docs = exact.documents()
    ref_logits, ref_grads = exact.per_document(model, docs)
    with register_varlen_attention(), configure_packing("torch_varlen"):
        model.set_attn_implementation("torch_varlen")
        batch, logits, grads = _packed(exact, model, docs)
    assert exact.worst(docs, batch, logits, ref_logits) < exact.ATOL
    exact.grads_close(ref_grads, grads)


def reference_varlen_kernel(query, key, value, cu_seqlens, max_seqlen, *, scale, window_left, causal):
    """Per-segment math attention, written independently of the backend, to test its plumbing on CPU."""
    outs = []
    n_rep = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    for s, e in itertools.pairwise(bounds):
        q = query[s:e].transpose(0, 1)
        k = key[s:e].repeat_interleave(n_rep, 1).transpose(0, 1)
        v = value[s:e].repeat_interleave(n_rep, 1).transpose(0, 1)
        scores = (q @ k.transpose(-1, -2)) * scale
        i = torch.arange(e - s)
        allowed = torch.ones(e - s, e - s, dtype=torch.bool)
        if causal:
            allowed &= i[None, :] <= i[:, None]
        if window_left >= 0:
            allowed &= i[None, :] >= i[:, None] - window_left
        scores = scores.masked_fill(~allowed, float("-inf"))
        outs.append((scores.softmax(-1) @ v).transpose(0, 1))
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma3"])
@pytest.mark.parametrize("source", ["mask", "cu_seqlens"])
def test_torch_varlen_plumbing_with_reference_kernel(make_model, exact, monkeypatch, arch, source):
    """Gather/scatter, GQA, scale, window and cu_seqlens of the varlen backend, with a reference kernel on CPU."""
    monkeypatch.setattr(backends, "varlen_kernel", reference_varlen_kernel)
    model = make_model(arch, "eager")
    docs = exact.documents()
    ref_logits, ref_grads = exact.per_document(model, docs)
    with register_varlen_attention(), configure_packing("torch_varlen"):
        model.set_attn_implementation("torch_varlen")
        batch = pack_sequences(docs, 32, return_cu_seqlens=True)
        extra = {}
        if source == "cu_seqlens":
            extra = {k: batch[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")}
        out, grads = exact.packed(model, batch, **_packed_inputs(batch), **extra)
        model.set_attn_implementation("eager")
    assert exact.worst(docs, batch, out, ref_logits) < exact.ATOL
    exact.grads_close(ref_grads, grads)


def test_packed_mask_rejected_by_unsupported_backend(make_model, exact):
    model = make_model("llama", "sdpa")
    batch = pack_sequences(exact.documents(), 32)
    with configure_packing("sdpa"):
        model.config._attn_implementation = "paged|sdpa"
        try:
            with pytest.raises(ValueError, match="cannot pack"):
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        finally:
            model.config._attn_implementation = "sdpa"


def test_varlen_segments_cover_every_token_without_gathers():
    """Documents and padding runs become segments of the flattened batch (no gather); padding is flagged."""
    mask = torch.tensor([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 0, 0], [1, 2, 3, 3, 3, 3]])
    seg = backends.cached_segments(mask)
    assert seg.cu_seqlens.tolist() == [0, 2, 5, 6, 10, 12, 13, 14, 18]
    assert seg.max_seqlen == 4
    assert seg.valid.flatten().tolist() == (mask.flatten() > 0).tolist()
    assert backends.cached_segments(mask) is seg  # memoised per mask object
    full = torch.tensor([[1, 1, 2], [1, 1, 1]])
    assert backends.cached_segments(full).valid is None
    with pytest.raises(ValueError):
        backends.cached_segments(torch.tensor([[1, 2, 1, 0]]))  # validated like get_unpad_data


@torch.library.custom_op("am_packing_tests::reference_varlen", mutates_args=())
def _reference_varlen_op(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    scale: float,
    window_left: int,
    causal: bool,
) -> torch.Tensor:
    return reference_varlen_kernel(
        query, key, value, cu_seqlens, max_seqlen, scale=scale, window_left=window_left, causal=causal
    )


@_reference_varlen_op.register_fake
def _(query, key, value, cu_seqlens, max_seqlen, scale, window_left, causal):
    return torch.empty_like(query)


def _opaque_reference_kernel(query, key, value, cu_seqlens, max_seqlen, *, scale, window_left, causal):
    """The reference kernel as one custom op, as opaque to dynamo as torch's own varlen_attn."""
    return _reference_varlen_op(query, key, value, cu_seqlens, max_seqlen, scale, window_left, causal)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_torch_varlen_layers_compile_without_graph_breaks(make_model, exact, monkeypatch, arch):
    """The mask entry hands each layer its batch's segments, so `torch.compile` per decoder layer traces the
    whole attention call: no graph break, and once two batches have been seen (segment count and longest
    document become dynamic) a batch with other boundaries compiles nothing. Exact against per-document."""
    from torch._dynamo.utils import counters

    monkeypatch.setattr(backends, "varlen_kernel", _opaque_reference_kernel)
    model = make_model(arch, "eager")
    batches = [exact.documents(seed) for seed in (1, 2, 3)]
    batches[1] = batches[1][:4]  # other document count, other longest document
    refs = [exact.per_document(model, docs, with_grad=False)[0] for docs in batches]
    torch._dynamo.reset()
    counters.clear()
    with register_varlen_attention(), configure_packing("torch_varlen"), torch.no_grad():
        model.set_attn_implementation("torch_varlen")
        for layer in model.model.layers:
            layer.compile(backend="eager")  # dynamo's tracing is what is tested; no inductor build on CPU
        try:
            graphs = []
            for docs, ref in zip(batches, refs, strict=True):
                batch, logits = _packed_logits(model, docs)
                assert exact.worst(docs, batch, logits, ref) < exact.ATOL
                graphs.append(counters["stats"]["unique_graphs"])
        finally:
            model.set_attn_implementation("eager")
            torch._dynamo.reset()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert graphs[2] == graphs[1], f"a third batch recompiled: unique graphs after each batch {graphs}"
