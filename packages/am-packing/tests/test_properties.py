"""Property suite: wrong types, dtypes, shapes and devices given to the public functions only ever raise
ValueError or TypeError, and the message names the argument (or the function returns normally)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import am_packing
from am_packing import (
    DocumentIdMask,
    PackingCollator,
    enable_packing,
    get_attn_implementation,
    get_seqlens_in_batch,
    get_unpad_data,
    is_indexed_packed_mask,
    pack_sequences,
    validate_indexed_mask,
)

DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64, torch.float16, torch.float32,
    torch.float64, torch.complex64,
]  # fmt: skip


@st.composite
def tensors(draw):
    shape = draw(st.lists(st.integers(0, 3), min_size=0, max_size=4))
    dtype = draw(st.sampled_from(DTYPES))
    device = draw(st.sampled_from(["cpu", "cpu", "cpu", "meta"]))
    values = torch.randint(-2, 5, shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 99))))
    t = values.to(dtype) if dtype != torch.bool else values > 0
    return t.to(device)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=4),
    st.complex_numbers(),
)
anything = st.one_of(scalars, tensors(), st.lists(st.one_of(scalars, tensors()), max_size=3))
ERRORS = (TypeError, ValueError)


def _assert_named(call, *names):
    try:
        call()
    except ERRORS as exc:
        message = str(exc)
        assert any(n in message for n in names), f"{type(exc).__name__} does not name {names}: {message}"


@settings(max_examples=150, deadline=None)
@given(tensors())
def test_mask_functions_name_attention_mask(mask):
    for fn in (get_unpad_data, get_seqlens_in_batch, validate_indexed_mask):
        _assert_named(lambda fn=fn: fn(mask), "attention_mask")
    assert isinstance(is_indexed_packed_mask(mask), bool)  # documented: never raises


@settings(max_examples=100, deadline=None)
@given(anything, anything, anything)
def test_get_unpad_data_arguments(mask, max_seqlen, strict):
    _assert_named(lambda: get_unpad_data(mask), "attention_mask")
    valid = torch.tensor([[1, 1, 2, 0]])
    _assert_named(lambda: get_unpad_data(valid, max_seqlen=max_seqlen), "max_seqlen")
    _assert_named(lambda: get_unpad_data(valid, strict=strict), "strict")
    assert isinstance(is_indexed_packed_mask(mask), bool)


@settings(max_examples=100, deadline=None)
@given(anything, anything, anything, anything, anything)
def test_pack_sequences_arguments(examples, max_length, pad_token_id, truncate, mode):
    good = [[1, 2, 3], [4, 5]]
    _assert_named(lambda: pack_sequences(examples, 8), "example")
    _assert_named(lambda: pack_sequences([examples], 8), "example")
    if not (
        isinstance(max_length, int) and 2**16 < max_length < 2**31
    ):  # valid, but rows that large allocate
        _assert_named(lambda: pack_sequences(good, max_length), "max_length")
    _assert_named(lambda: pack_sequences(good, 8, pad_token_id=pad_token_id), "pad_token_id")
    _assert_named(lambda: pack_sequences(good, 8, truncate=truncate), "truncate")
    _assert_named(lambda: pack_sequences(good, 8, return_cu_seqlens=truncate), "return_cu_seqlens")
    _assert_named(lambda: pack_sequences(good, 8, mode=mode), "mode")
    _assert_named(lambda: PackingCollator(max_length), "max_length")
    _assert_named(lambda: PackingCollator(8, pad_token_id), "pad_token_id")
    _assert_named(lambda: PackingCollator(8)([{"input_ids": examples}]), "example", "input_ids")
    _assert_named(lambda: PackingCollator(8)([{"input_ids": [1, 2], "labels": examples}]), "labels")


@settings(max_examples=60, deadline=None)
@given(anything)
def test_patchers_refuse_bad_arguments(value):
    import transformers

    registry = dict(transformers.AttentionInterface._global_mapping)
    if value not in am_packing.SUPPORTED_ATTN_IMPLEMENTATIONS:  # a valid name would patch (tested elsewhere)
        _assert_named(lambda: am_packing.configure_packing(value), "attn_implementation")
    if not isinstance(value, str) or not value or value in registry or value != value.strip():
        _assert_named(lambda: am_packing.register_varlen_attention(value), "name")
    _assert_named(lambda: enable_packing(value), "model")
    _assert_named(lambda: DocumentIdMask(value), "document_ids")
    assert isinstance(get_attn_implementation(value), str)
    assert transformers.AttentionInterface._global_mapping.keys() == registry.keys()


@pytest.mark.parametrize("backend", [None, 3, "", "paged|sdpa", "flash_attention_2", "sdpa "])
def test_enable_packing_names_backend(make_model, backend):
    model = make_model("llama", "sdpa")
    if backend is None:
        with enable_packing(model, backend):  # None: the model's own backend
            return
    with pytest.raises(ERRORS, match="backend"):
        enable_packing(model, backend)
