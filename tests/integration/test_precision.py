"""am_precision.cast_model_to_dtype(model, bfloat16) on every built-in tiny model: exactly the fp32-kept set.

For bfloat16 that is `_keep_in_fp32_modules_strict` only (transformers' rule: the non-strict list applies to
float16 casts), matched on whole dotted segments.
"""

from __future__ import annotations

import copy

import integration_stack as stack
import pytest
import torch

from am_cli.tiny_models import build_model
from am_precision import cast_model_to_dtype, get_fp32_module_keywords, get_fp32_parameter_names


def _declared_keywords(
    model: torch.nn.Module, attrs: tuple[str, ...] = ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
) -> set[str]:
    """`_keep_in_fp32_modules(_strict)` as declared on the model and its submodules (read directly)."""
    found: set[str] = set()
    for module in model.modules():
        for attr in attrs:
            found |= set(getattr(module, attr, None) or ())
    return found


def _strict_keywords(model: torch.nn.Module) -> set[str]:
    """What a bf16 cast keeps: the strict list only."""
    return _declared_keywords(model, ("_keep_in_fp32_modules_strict",))


def _segment_match(name: str, keywords: set[str]) -> bool:
    """Whole dotted segments: `norm` keeps `model.norm.weight`, not `input_layernorm` or `q_norm`."""
    parts = name.split(".")
    for keyword in keywords:
        kw = keyword.split(".")
        if any(parts[i : i + len(kw)] == kw for i in range(len(parts) - len(kw) + 1)):
            return True
    return False


def _floating_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if b.is_floating_point())
    return tensors


def _assert_bf16_cast_keeps(model: torch.nn.Module, keywords: set[str]) -> set[str]:
    before = {n: t.detach().clone() for n, t in _floating_tensors(model).items()}
    expected = {n for n in before if _segment_match(n, keywords)}
    assert set(get_fp32_parameter_names(model)) == {
        n for n in expected if n in dict(model.named_parameters())
    }
    cast_model_to_dtype(model, torch.bfloat16)
    after = _floating_tensors(model)
    assert after.keys() == before.keys()
    kept = {n for n, t in after.items() if t.dtype == torch.float32}
    assert kept == expected
    assert {t.dtype for n, t in after.items() if n not in kept} <= {torch.bfloat16}
    for name in kept:  # restored from the fp32 original, not round-tripped through bf16
        assert torch.equal(after[name], before[name]), name
    return kept


@pytest.mark.parametrize("arch", stack.arch_params())
def test_bf16_cast_keeps_exactly_the_declared_fp32_modules(arch: str) -> None:
    model = build_model(stack.stack_config(arch))
    declared = _declared_keywords(model)
    assert set(get_fp32_module_keywords(model)) == declared
    assert set(get_fp32_module_keywords(model, dtype=torch.bfloat16)) == _strict_keywords(model)
    kept = _assert_bf16_cast_keeps(model, _strict_keywords(model))
    if not declared:  # none of the built-in architectures declares any in transformers 5.3-5.23
        assert kept == set()


@pytest.mark.parametrize("arch", stack.arch_params())
def test_bf16_cast_keeps_instance_declared_fp32_modules(arch: str) -> None:
    """The same rule with keywords that exist in every model: the final norm and the LM head (strict), and
    the embeddings (non-strict: float16 only, so a bf16 cast leaves them bf16)."""
    model = build_model(stack.stack_config(arch))
    model._keep_in_fp32_modules_strict = ["norm", "lm_head"]
    model._keep_in_fp32_modules = ["embed_tokens"]
    kept = _assert_bf16_cast_keeps(copy.deepcopy(model), _strict_keywords(model))
    assert not [n for n in kept if "embed_tokens" in n]
    text_prefix = "model.language_model." if hasattr(model.config, "text_config") else "model."
    assert {f"{text_prefix}norm.weight", "lm_head.weight"} <= kept
    assert not [n for n in kept if "layernorm" in n or "q_norm" in n or "k_norm" in n]
