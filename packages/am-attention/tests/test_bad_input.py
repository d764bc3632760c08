"""Wrong types and values: a ValueError or TypeError naming the argument, never a deep traceback or a coercion."""

from __future__ import annotations

import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import am_attention as A

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from _models import build

REF = A.ReferenceDotProductAttention


@pytest.mark.parametrize("bad", [None, 3, "model", 1.5])
@pytest.mark.parametrize("function", [A.inject_te_attention, A.remove_te_attention, A.plan_te_attention])
def test_model_functions_name_a_non_module(function, bad):
    with pytest.raises(TypeError, match=rf"model must be a torch.nn.Module, got {bad!r}"):
        function(bad)


@pytest.mark.parametrize("bad", [None, 3, "attn"])
def test_module_injection_names_a_non_module(bad):
    with pytest.raises(TypeError, match=r"module must be a torch\.nn\.Module"):
        A.inject_te_attention_into_module(bad, dot_product_attention_cls=REF)


def test_kernel_class_returning_none_or_not_callable_is_refused():
    model = build("llama")
    before = {n: dict(vars(m)) for n, m in model.named_modules()}
    with pytest.raises(TypeError, match=r"dot_product_attention_cls .* returned None"):
        A.inject_te_attention(model, dot_product_attention_cls=lambda **kw: None)
    with pytest.raises(TypeError, match="dot_product_attention_cls must be a class or callable, got 'te'"):
        A.inject_te_attention(model, dot_product_attention_cls="te")
    with pytest.raises(TypeError, match=r"dot_product_attention_cls .* returned None"):
        A.inject_te_attention_into_module(
            model.model.layers[0].self_attn, dot_product_attention_cls=lambda **kw: None
        )
    assert {n: dict(vars(m)) for n, m in model.named_modules()} == before


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_attention_heads=0, kv_channels=8), "num_attention_heads"),
        (dict(num_attention_heads=4, kv_channels=-1), "kv_channels"),
        (dict(num_attention_heads=4, kv_channels=8, num_gqa_groups=0), "num_gqa_groups"),
        (dict(num_attention_heads=4, kv_channels=8, num_gqa_groups=3), "num_gqa_groups"),
        (dict(num_attention_heads=4, kv_channels=8, attention_dropout=1.5), "attention_dropout"),
        (dict(num_attention_heads=4, kv_channels=8, softmax_scale=0.0), "softmax_scale"),
        (dict(num_attention_heads=4, kv_channels=8, window_size=(2,)), "window_size"),
        (dict(num_attention_heads=True, kv_channels=8), "num_attention_heads"),
    ],
)
def test_reference_kernel_rejects_bad_construction(kwargs, name):
    with pytest.raises(ValueError, match=name):
        REF(**kwargs)


@pytest.mark.parametrize(
    "cu, name",
    [
        (torch.tensor([0, 4, 20]), "cu_seqlens_q"),  # past the 10 tokens
        (torch.tensor([1, 4, 10]), "cu_seqlens_q"),  # does not start at 0
        (torch.tensor([0, 6, 4, 10]), "cu_seqlens_q"),  # decreases
        (torch.tensor([0.0, 10.0]), "cu_seqlens_q"),  # not integer
    ],
)
def test_reference_kernel_rejects_out_of_range_cu_seqlens(cu, name):
    dpa = REF(2, 8, qkv_format="thd", attn_mask_type="padding_causal")
    q = torch.randn(10, 2, 8)
    with pytest.raises(ValueError, match=name):
        dpa(q, q, q, cu_seqlens_q=cu, cu_seqlens_kv=torch.tensor([0, 10]))


@pytest.mark.parametrize("name", ["has_packed_sequence", "use_liger_kernel"])
@pytest.mark.parametrize("bad", ["no", 0, None])
def test_preload_flags_must_be_bools(name, bad):
    kwargs = dict(
        tp_size=1, cp_size=1, has_packed_sequence=False, attn_implementation="sdpa", use_liger_kernel=False
    )
    kwargs[name] = bad
    with pytest.raises(TypeError, match=rf"{name} must be a bool, got {bad!r}"):
        A.apply_preload_overrides(**kwargs)


def test_cu_seq_lens_kwargs_out_of_range_are_named():
    model = build("llama")
    attn = model.model.layers[0].self_attn
    q = torch.randn(1, 4, 8, 16)
    with A.inject_te_attention(model, dot_product_attention_cls=REF):
        for bad in (torch.tensor([0, 3, 12]), torch.tensor([0, 5, 3, 8])):
            with pytest.raises(ValueError, match="cu_seq_lens_q"):
                A.te_attention_forward(attn, q, q, q, None, cu_seq_lens_q=bad, cu_seq_lens_k=bad)


# --- property: every public function, fed junk, returns or raises ValueError/TypeError naming the argument ---

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-2, 2), max_size=3),
    st.tuples(st.integers(-2, 2), st.integers(-2, 2)),
    st.sampled_from(
        [
            torch.zeros(2),
            torch.ones(2, 3, dtype=torch.long),
            torch.zeros(1, 1, 3, 3, dtype=torch.int32),
            torch.ones(1, 2, 4, 4, dtype=torch.bool),
            torch.zeros(1, 1, 2, 2, dtype=torch.complex64),
            torch.nn.ReLU(),
            object(),
        ]
    ),
)

# function -> (argument names, a valid value for each)
SIGNATURES = {
    A.inject_te_attention: {"model": None},
    A.inject_te_attention_into_module: {"module": None},
    A.remove_te_attention: {"model": None},
    A.plan_te_attention: {"model": None},
    A.infer_attn_params: {"module": None},
    A.proj_out_features: {"proj": None},
    A.detect_causal_mask: {
        "attn_mask": torch.ones(1, 1, 3, 3, dtype=torch.bool).tril(),
        "window_size": (-1, 0),
    },
    A.next_fallback_attn: {"attn_implementation": "sdpa"},
    A.apply_preload_overrides: {
        "tp_size": 1,
        "cp_size": 1,
        "has_packed_sequence": False,
        "attn_implementation": "sdpa",
        "use_liger_kernel": False,
    },
    A.verify_sdpa_support: {"model": torch.nn.ReLU(), "cp_size": 1},
    REF: {
        "num_attention_heads": 4,
        "kv_channels": 8,
        "num_gqa_groups": 2,
        "attention_dropout": 0.0,
        "qkv_format": "bshd",
        "attn_mask_type": "causal",
        "window_size": (-1, 0),
        "softmax_scale": 0.5,
    },
}
CASES = [(f, name) for f, args in SIGNATURES.items() for name in args]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(CASES), junk=JUNK)
def test_public_functions_name_the_bad_argument(case, junk):
    function, name = case
    kwargs = dict(SIGNATURES[function])
    kwargs[name] = junk
    if function is A.inject_te_attention_into_module or function is A.inject_te_attention:
        kwargs["dot_product_attention_cls"] = REF
    try:
        function(**kwargs)
    except (ValueError, TypeError) as exc:
        assert name in str(exc), f"{function.__name__}({name}={junk!r}): {exc}"
