import pytest
import torch
from torch import nn

from am_precision import get_fp32_module_keywords, get_fp32_parameter_names
from am_precision.fp32_rules import fp32_tensor_names, get_strict_fp32_module_keywords, name_matches


@pytest.mark.parametrize(
    "name",
    ["model.norm", "model.norm.weight", "norm", "norm.weight", "model.layers.0.self_attn.norm.bias"],
)
def test_norm_matches_whole_segment(name):
    assert name_matches(name, ["norm"])


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.input_layernorm.weight",  # the seed's substring rule matched this; we do not
        "model.layers.0.post_attention_layernorm",
        "model.normalizer_proj.weight",
        "model.prenorm",
        "model.norms.0",
        "",
    ],
)
def test_norm_does_not_match_inside_a_segment(name):
    assert not name_matches(name, ["norm"])


def test_layer_norms_are_kept_only_when_named():
    name = "model.layers.0.input_layernorm.weight"
    assert name_matches(name, ["input_layernorm"])
    assert name_matches(name, ["norm", "input_layernorm"])


@pytest.mark.parametrize(
    ("keyword", "name", "expected"),
    [
        ("mlp.gate.weight", "model.layers.3.mlp.gate.weight", True),
        ("mlp.gate.weight", "model.layers.3.mlp.gate_proj.weight", False),
        ("mlp.gate", "model.layers.3.mlp.gate.weight", True),
        ("mlp.gate", "model.layers.3.mlp.up.gate", False),  # segments must be contiguous, in order
        ("attn_hc.fn", "layers.1.attn_hc.fn", True),
        ("attn_hc.fn", "layers.1.attn_hc.fn_extra", False),
        ("wo", "encoder.block.0.layer.1.DenseReluDense.wo.weight", True),
        ("wo", "encoder.block.0.layer.0.SelfAttention.o.weight", False),
        ("layers.0", "model.layers.0.mlp", True),
        ("layers.0", "model.layers.10.mlp", False),
    ],
)
def test_dotted_keywords(keyword, name, expected):
    assert name_matches(name, [keyword]) is expected


class _Holder(nn.Module):
    _keep_in_fp32_modules = ["norm", "router"]  # noqa: RUF012
    _keep_in_fp32_modules_strict = {"router", "bias_c"}  # noqa: RUF012

    def __init__(self):
        super().__init__()
        self.child = _Child()
        self.norm = nn.LayerNorm(4)
        self.router = nn.Linear(4, 2)
        self.normalizer_proj = nn.Linear(4, 4)


class _Child(nn.Module):
    _keep_in_fp32_modules = ("child_only",)

    def __init__(self):
        super().__init__()
        self.child_only = nn.Linear(2, 2)


def test_keywords_merge_strict_first_and_children():
    m = _Holder()
    assert get_fp32_module_keywords(m) == ["bias_c", "router", "norm", "child_only"]
    assert get_strict_fp32_module_keywords(m) == ["bias_c", "router"]


def test_parameter_names_helper_is_pure_and_exact():
    m = _Holder()
    before = {n: p.dtype for n, p in m.named_parameters()}
    assert get_fp32_parameter_names(m) == ["router.weight", "router.bias"]  # bf16: the strict list only
    names = get_fp32_parameter_names(m, torch.float16)
    assert names == [
        "child.child_only.weight",
        "child.child_only.bias",
        "norm.weight",
        "norm.bias",
        "router.weight",
        "router.bias",
    ]
    assert {n: p.dtype for n, p in m.named_parameters()} == before


def test_bad_declarations_raise():
    m = _Holder()
    m._keep_in_fp32_modules = "norm"
    with pytest.raises(TypeError, match="string 'norm'"):
        get_fp32_module_keywords(m)
    m._keep_in_fp32_modules = ["norm", ".bad"]
    with pytest.raises(ValueError, match=r"\.bad"):
        get_fp32_module_keywords(m)


def test_integer_tensors_are_not_listed():
    m = _Holder()
    m.norm.register_buffer("counts", torch.zeros(3, dtype=torch.long))
    m.norm.register_buffer("stat", torch.zeros(3))
    _, buffers = fp32_tensor_names(m, dtype=torch.float16)
    assert buffers == ["norm.stat"]
    assert fp32_tensor_names(m, dtype=torch.bfloat16) == (["router.weight", "router.bias"], [])


@pytest.mark.parametrize(
    ("dtype", "expected"),
    [
        (None, ["bias_c", "router", "norm", "child_only"]),
        (torch.float16, ["bias_c", "router", "norm", "child_only"]),
        (torch.bfloat16, ["bias_c", "router"]),
        (torch.float32, []),
        (torch.float64, []),
    ],
)
def test_keywords_per_target_dtype(dtype, expected):
    assert get_fp32_module_keywords(_Holder(), dtype=dtype) == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_keywords_per_dtype_are_the_installed_transformers_rule(keep_llama, dtype):
    """Our rule against transformers' own dtype plan (`PreTrainedModel._get_dtype_plan`, used by
    `from_pretrained(dtype=...)`), by behaviour on the installed version."""
    model = keep_llama()
    plan = getattr(model, "_get_dtype_plan", None)
    if plan is None:
        pytest.skip("the installed transformers has no PreTrainedModel._get_dtype_plan to compare with")
    expected = {k for k, v in plan(dtype).items() if v == torch.float32}
    assert set(get_fp32_module_keywords(model, dtype=dtype)) == expected


def test_a_bare_string_of_keywords_is_a_type_error():
    # A str is iterable: read as keywords it would be one per character ('n', 'o', 'r', 'm').
    with pytest.raises(TypeError, match=r"keywords.*did you mean \['norm'\]"):
        name_matches("model.n.o.r.m", "norm")
    assert name_matches("model.n.o.r.m", ["n.o.r.m"]) and not name_matches("model.n.o.r.m", ["norm"])


@pytest.mark.parametrize("name", [None, 3, b"model.norm", ["model", "norm"]])
def test_name_must_be_a_str(name):
    with pytest.raises(TypeError, match="name must be a str"):
        name_matches(name, ["norm"])


@pytest.mark.parametrize("keyword", ["", "a..b", ".norm", 3, None])
def test_bad_keyword_entries_are_value_errors(keyword):
    with pytest.raises(ValueError, match="keywords"):
        name_matches("model.norm", [keyword])


@pytest.mark.parametrize("model", [None, 3, "model", object()])
def test_non_modules_are_type_errors_naming_model(model):
    for fn in (get_fp32_module_keywords, get_strict_fp32_module_keywords, get_fp32_parameter_names):
        with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
            fn(model)
