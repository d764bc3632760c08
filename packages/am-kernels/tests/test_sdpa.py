import pytest
import torch
from torch.nn.attention import SDPBackend

from am_kernels import (
    DEFAULT_SDPA_BACKENDS,
    assert_same_signature,
    get_sdpa_backends,
    patch_sdpa_backends,
    unpatch_sdpa_backends,
)

IDS = torch.arange(24).reshape(2, 12) % 128


def test_default_order_is_the_seed_order():
    assert DEFAULT_SDPA_BACKENDS == (
        SDPBackend.CUDNN_ATTENTION,
        SDPBackend.FLASH_ATTENTION,
        SDPBackend.EFFICIENT_ATTENTION,
        SDPBackend.MATH,
    )


def test_math_forced_matches_unpatched_logits_exactly(tiny):
    model = tiny("llama")
    with torch.no_grad():
        ref = model(IDS).logits
        cls_forward = type(model).forward
        assert patch_sdpa_backends(model, [SDPBackend.MATH]) is model
        assert get_sdpa_backends(model) == (SDPBackend.MATH,)
        out = model(IDS).logits
    # The reference with the math kernel computed explicitly, the same arithmetic as unpatched on CPU.
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([SDPBackend.MATH]):
        ref_math = type(model).forward(model, IDS).logits
    torch.testing.assert_close(out, ref_math, rtol=0, atol=0)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # fp32, flash-cpu vs math ordering
    unpatch_sdpa_backends(model)
    assert "forward" not in vars(model) and model.forward.__func__ is cls_forward


def test_context_is_active_inside_forward(tiny):
    # Only EFFICIENT_ATTENTION has no CPU kernel: an error proves the pin reaches SDPA.
    model = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.EFFICIENT_ATTENTION])
    try:
        with pytest.raises(RuntimeError, match="No viable backend"):
            model(IDS)
    finally:
        unpatch_sdpa_backends(model)
    model(IDS)  # works again once unpatched


def test_signature_docstring_and_default_backends(tiny):
    model = tiny("qwen2")
    original = model.forward
    patch_sdpa_backends(model)
    try:
        assert get_sdpa_backends(model) == DEFAULT_SDPA_BACKENDS
        assert_same_signature(original, model.forward)
        assert model.forward.__doc__ == original.__doc__ and model.forward.__name__ == "forward"
        assert model(IDS).logits.shape == (2, 12, 128)
    finally:
        unpatch_sdpa_backends(model)


def test_idempotent_and_repin(tiny):
    model = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.MATH])
    first = vars(model)["forward"]
    patch_sdpa_backends(model, [SDPBackend.MATH])
    assert vars(model)["forward"] is first
    patch_sdpa_backends(model, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
    assert get_sdpa_backends(model) == (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)
    # Re-pinning replaced our wrapper instead of stacking a second one.
    assert vars(model)["forward"].__wrapped__.__func__ is type(model).forward
    unpatch_sdpa_backends(model)
    assert "forward" not in vars(model)
    unpatch_sdpa_backends(model)  # undo of an unpatched object is a no-op


def test_plain_object_and_class_targets():
    class Thing:
        def forward(self, x, *, scale=2):
            """Doubles."""
            return torch.nn.functional.scaled_dot_product_attention(x, x, x) * scale

    x = torch.randn(1, 1, 4, 8)
    thing = Thing()
    patch_sdpa_backends(thing, [SDPBackend.MATH])
    assert thing.forward.__doc__ == "Doubles."
    torch.testing.assert_close(thing.forward(x), Thing().forward(x))
    unpatch_sdpa_backends(thing)
    assert vars(thing) == {}

    original = vars(Thing)["forward"]
    patch_sdpa_backends(Thing, [SDPBackend.EFFICIENT_ATTENTION])
    try:
        with pytest.raises(RuntimeError, match="No viable backend"):
            Thing().forward(x)
    finally:
        unpatch_sdpa_backends(Thing)
    assert vars(Thing)["forward"] is original


def test_bad_input():
    with pytest.raises(TypeError, match="object"):
        patch_sdpa_backends(object(), [SDPBackend.MATH])
    module = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="empty"):
        patch_sdpa_backends(module, [])
    with pytest.raises(TypeError, match=r"backends\[1\] is 'math'"):
        patch_sdpa_backends(module, [SDPBackend.MATH, "math"])
    with pytest.raises(TypeError, match="single value"):
        patch_sdpa_backends(module, SDPBackend.MATH)
    with pytest.raises(ValueError, match="duplicates"):
        patch_sdpa_backends(module, [SDPBackend.MATH, SDPBackend.MATH])
    with pytest.raises(ValueError, match="ERROR"):
        patch_sdpa_backends(module, [SDPBackend.ERROR])
    assert "forward" not in vars(module)


def test_unpatch_refuses_while_covered_by_a_foreign_wrapper(tiny):
    import functools

    model = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.MATH])
    ours = vars(model)["forward"]
    foreign = functools.wraps(ours)(lambda *a, **k: ours(*a, **k))
    model.forward = foreign
    with pytest.raises(RuntimeError, match="patched over it"):
        unpatch_sdpa_backends(model)
    model.forward = ours
    unpatch_sdpa_backends(model)
    assert "forward" not in vars(model)


def test_composes_with_liger_in_either_undo_order(tiny, torch_ops, kit):
    from am_kernels import patch_liger_kernel, unpatch_liger_kernel

    model = tiny("llama")
    pristine = kit.instance_state(model)
    patch_sdpa_backends(model, [SDPBackend.MATH])
    patch_liger_kernel(model, ops=torch_ops)
    assert_same_signature(type(model).forward.__get__(model), model.forward)
    with pytest.raises(RuntimeError, match="patched over"):
        unpatch_sdpa_backends(model)  # covered by Liger's forward: refuse rather than do nothing
    unpatch_liger_kernel(model)
    unpatch_sdpa_backends(model)
    kit.assert_same_state(pristine, kit.instance_state(model))
