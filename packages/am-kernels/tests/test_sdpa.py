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


def _halve(model):
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)


def _math_logits(model):
    with torch.no_grad(), torch.nn.attention.sdpa_kernel([SDPBackend.MATH]):
        return type(model).forward(model, IDS).logits


def test_deepcopy_of_pinned_model_computes_with_its_own_weights(tiny, kit):
    import copy

    model = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.MATH])
    try:
        clone = copy.deepcopy(model)
        _halve(clone)
        with torch.no_grad():
            ours, theirs = model(IDS).logits, clone(IDS).logits
        assert not torch.equal(ours, theirs)  # the copy computes with its own (halved) weights
        torch.testing.assert_close(theirs, _math_logits(clone), rtol=0, atol=0)
        assert vars(clone)["forward"].__self__ is clone and get_sdpa_backends(clone) == (SDPBackend.MATH,)
        unpatch_sdpa_backends(clone)  # the copy's undo touches the copy only
        assert "forward" not in vars(clone) and get_sdpa_backends(model) == (SDPBackend.MATH,)
    finally:
        unpatch_sdpa_backends(model)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_pinned_model_keeps_its_pin_and_computes_with_its_own_weights(tiny, how):
    import io
    import pickle

    def roundtrip(obj):
        if how == "pickle":
            return pickle.loads(pickle.dumps(obj))
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        buffer.seek(0)
        return torch.load(buffer, weights_only=False)

    model = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.MATH])
    try:
        loaded = roundtrip(model)
        assert get_sdpa_backends(loaded) == (SDPBackend.MATH,) and vars(loaded)["forward"].__self__ is loaded
        with torch.no_grad():
            torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)
        _halve(loaded)
        with torch.no_grad():
            assert not torch.equal(loaded(IDS).logits, model(IDS).logits)
        unpatch_sdpa_backends(loaded)
        assert "forward" not in vars(loaded)
        # The pin itself survives: EFFICIENT_ATTENTION has no CPU kernel, so the loaded forward must fail.
        patch_sdpa_backends(loaded, [SDPBackend.EFFICIENT_ATTENTION])
        again = roundtrip(loaded)
        with pytest.raises(RuntimeError, match="No viable backend"):
            again(IDS)
        unpatch_sdpa_backends(again)
        again(IDS)
    finally:
        unpatch_sdpa_backends(model)


def test_repin_under_liger_is_idempotent_or_refused_and_stays_visible(tiny, torch_ops, kit):
    from am_kernels import patch_liger_kernel, unpatch_liger_kernel

    model = tiny("llama")
    pristine = kit.instance_state(model)
    patch_sdpa_backends(model, [SDPBackend.MATH])
    patch_liger_kernel(model, ops=torch_ops)
    try:
        assert get_sdpa_backends(model) == (SDPBackend.MATH,)  # still pinned beneath Liger's forward
        state = kit.instance_state(model)
        assert patch_sdpa_backends(model, [SDPBackend.MATH]) is model  # the same pin again: a no-op
        kit.assert_same_state(state, kit.instance_state(model))
        with pytest.raises(
            ValueError, match=r"pinned to \['MATH'\] beneath am_kernels.liger.fused_linear_cross"
        ):
            patch_sdpa_backends(model, [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH])
        kit.assert_same_state(state, kit.instance_state(model))
        assert_same_signature(type(model).forward.__get__(model), model.forward)
    finally:
        unpatch_liger_kernel(model)
        unpatch_sdpa_backends(model)
    kit.assert_same_state(pristine, kit.instance_state(model))


def test_pin_under_liger_holds_on_the_fused_training_path_and_in_a_deep_copy(tiny, torch_ops, kit):
    import copy

    from am_kernels import patch_liger_kernel, unpatch_liger_kernel

    model = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.EFFICIENT_ATTENTION])  # no CPU kernel: running pinned raises
    patch_liger_kernel(model, ops=torch_ops)
    try:
        model.train()
        with pytest.raises(RuntimeError, match="No viable backend"):
            model(IDS, labels=IDS)  # the fused loss calls the base model itself, still inside the pin
        model.eval()
        with pytest.raises(RuntimeError, match="No viable backend"):
            model(IDS)
    finally:
        unpatch_liger_kernel(model)
        unpatch_sdpa_backends(model)

    ref = tiny("llama")
    patch_sdpa_backends(model, [SDPBackend.MATH])
    patch_liger_kernel(model, ops=torch_ops)
    try:
        clone = copy.deepcopy(model)
        _halve(clone)
        ref.load_state_dict(clone.state_dict())
        with torch.no_grad():  # eval goes through Liger's forward into the copy's own pinned forward
            torch.testing.assert_close(clone(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        assert get_sdpa_backends(clone) == (SDPBackend.MATH,)
        unpatch_liger_kernel(clone)
        unpatch_sdpa_backends(clone)
        assert "forward" not in vars(clone)
    finally:
        unpatch_liger_kernel(model)
        unpatch_sdpa_backends(model)
