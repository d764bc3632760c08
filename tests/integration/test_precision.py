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


def _norm_weights_off_one(model: torch.nn.Module) -> None:
    """Norm weights other than their init, so a missing, doubled or misplaced norm changes the output."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.add_(torch.rand(p.shape, generator=generator) * 0.5)


@pytest.mark.parametrize("arch", stack.arch_params())
def test_te_mlp_is_exact_or_refused_on_every_architecture(arch: str) -> None:
    """inject_te_mlp (reference LayerNormMLP) on every built-in model: either every swapped layer computes
    what the plain model computes (logits, fp32) and undo restores it, or it refuses with a reason."""
    from am_precision import ReferenceTELayerNormMLP, inject_te_mlp, plan_te_mlp

    model = build_model(stack.stack_config(arch)).eval()
    _norm_weights_off_one(model)
    vocab = stack.text_config(model.config).vocab_size
    ids = torch.randint(3, min(vocab, 100), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    plan = plan_te_mlp(model, mlp_cls=ReferenceTELayerNormMLP)
    try:
        handle = inject_te_mlp(model, mlp_cls=ReferenceTELayerNormMLP)
    except (ValueError, RuntimeError) as exc:
        assert "inject_te_mlp" in str(exc)
        assert not any(type(m).__name__ == "FusedNormMLP" for m in model.modules())
        return
    assert handle.taken == [r.name for r in plan if r.taken]
    with torch.no_grad():
        # The reference rounds the norm once after the weight, HF before it: fp32 rounding apart.
        torch.testing.assert_close(model(input_ids=ids).logits, ref, rtol=1e-4, atol=1e-5)
    handle.revert()
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, ref)


def test_te_mlp_refuses_a_gemma_layout_even_when_its_mlp_is_silu() -> None:
    """Gemma's `post_attention_layernorm` normalizes the attention output, and `pre_feedforward_layernorm`
    the MLP input. With a SiLU MLP the pair passes the per-layer probe, so the check that refuses it is the
    one on the whole model: the MLP does not receive that norm's output. Nothing may stay swapped."""
    from am_precision import ReferenceTELayerNormMLP, inject_te_mlp, plan_te_mlp

    if not stack.TINY_ARCHS["gemma3"].available():
        pytest.skip("this transformers has no gemma3")
    config = stack.stack_config("gemma3")
    stack.text_config(config).hidden_activation = "silu"
    model = build_model(config).eval()
    assert all(r.taken for r in plan_te_mlp(model, mlp_cls=ReferenceTELayerNormMLP))
    with pytest.raises(RuntimeError, match="not the unmodified tensor the layer's norm"):
        inject_te_mlp(model, mlp_cls=ReferenceTELayerNormMLP)
    assert not any(type(m).__name__ in ("FusedNormMLP", "NormInMLP") for m in model.modules())
