import copy
import dataclasses
import inspect
import sys
import types

import pytest
import torch

from am_kernels import (
    LIGER_PLANS,
    assert_same_signature,
    get_liger_kernel_patch,
    get_patch_report,
    load_liger_ops,
    patch_liger_kernel,
    supported_model_types,
    unpatch_liger_kernel,
)
from am_kernels._patch import patch_name

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma3_text"]
IDS = (torch.arange(32).reshape(2, 16) * 7) % 128


def _by_class(model, name):
    return [m for m in model.modules() if type(m).__name__ == name]


@pytest.mark.parametrize("model_type", ARCHS)
def test_real_liger_swaps_expected_modules_and_undo_restores(tiny, model_type, kit):
    model = tiny(model_type)
    plan = LIGER_PLANS[model_type]
    before = kit.instance_state(model)
    originals = {id(m): m.forward for m in model.modules()}

    assert patch_liger_kernel(model) is model
    assert "liger_kernel" in sys.modules
    ops = get_liger_kernel_patch(model)
    assert ops is not None and ops.model_type == model_type

    norms = _by_class(model, plan.norm_class)
    mlps = _by_class(model, plan.mlp_class)
    attns = _by_class(model, plan.attention_class)
    assert len(mlps) == len(attns) == 2 and len(norms) >= 5
    for norm in norms:
        assert norm.forward.__am_patch__ == "am_kernels.liger.rms_norm"
        assert norm._get_name() == "LigerRMSNorm"
        assert_same_signature(originals[id(norm)], norm.forward)
    for mlp in mlps:
        assert mlp.forward.__am_patch__ == f"am_kernels.liger.{plan.mlp_kind}"
        assert mlp._get_name() in ("LigerSwiGLUMLP", "LigerGEGLUMLP")
        assert_same_signature(originals[id(mlp)], mlp.forward)
    liger_rope = load_liger_ops().rotary_pos_emb
    for attn in attns:
        assert attn.forward.__am_patch__ == "am_kernels.liger.rope"
        rope = inspect.unwrap(attn.forward.__func__).__globals__[plan.rope_function]
        assert rope.__am_patch__ == "am_kernels.liger.rope"
        assert rope.__closure__[0].cell_contents.rotary_pos_emb is liger_rope
        assert_same_signature(originals[id(attn)], attn.forward)
    assert model.forward.__am_patch__ == "am_kernels.liger.fused_linear_cross_entropy"
    assert_same_signature(originals[id(model)], model.forward)
    text = repr(model)
    assert "LigerRMSNorm" in text and "+LigerRope" in text and "+LigerFusedLinearCrossEntropy" in text
    # The classes themselves are untouched (the autouse fixture checks the modeling modules too).
    assert norms[0].forward is vars(norms[0])["forward"]

    unpatch_liger_kernel(model)
    kit.assert_same_state(before, kit.instance_state(model))
    assert get_liger_kernel_patch(model) is None
    assert "LigerRMSNorm" not in repr(model)


@pytest.mark.parametrize("model_type", ARCHS)
def test_glue_numbers_match_unpatched_with_torch_ops(tiny, torch_ops, model_type, kit):
    calls = {}

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] = calls.get(name, 0) + 1
            return fn(*args, **kwargs)

        return wrapper

    ops = dataclasses.replace(
        torch_ops,
        **{f.name: counted(f.name, getattr(torch_ops, f.name)) for f in dataclasses.fields(torch_ops)[:-1]},
    )
    ref, model = tiny(model_type), tiny(model_type)
    patch_liger_kernel(model, ops=ops)
    try:
        with torch.no_grad():
            # fp32 with the same arithmetic: the glue must reproduce transformers' numbers closely.
            torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        n_norms = len(_by_class(model, LIGER_PLANS[model_type].norm_class))
        mlp_op = "geglu" if model_type == "gemma3_text" else "swiglu"
        assert calls == {"rms_norm": n_norms, mlp_op: 2, "rotary_pos_emb": 2}
        calls.clear()
        model.train(), ref.train()
        labels = IDS.clone()
        labels[:, :3] = -100
        out, expected = model(IDS, labels=labels), ref(IDS, labels=labels)
        assert out.logits is None and calls["fused_linear_cross_entropy"] == 1
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        expected.loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        # num_items_in_batch (gradient accumulation) and tuple output go through the same path.
        kwargs = dict(labels=labels, num_items_in_batch=torch.tensor(20), return_dict=False)
        torch.testing.assert_close(model(IDS, **kwargs)[0], ref(IDS, **kwargs)[0], rtol=1e-5, atol=1e-6)
    finally:
        unpatch_liger_kernel(model)


def test_cross_entropy_option_uses_instance_loss_function(tiny, torch_ops, kit):
    ref, model = tiny("qwen2"), tiny("qwen2")
    default_loss = model.loss_function
    patch_liger_kernel(model, ops=torch_ops, cross_entropy=True, fused_linear_cross_entropy=False)
    try:
        assert model.loss_function.__am_patch__ == "am_kernels.liger.cross_entropy"
        assert ref.loss_function is default_loss  # only this instance
        out, expected = model(IDS, labels=IDS), ref(IDS, labels=IDS)
        assert out.logits is not None
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
    finally:
        unpatch_liger_kernel(model)
    assert "_loss_function" not in vars(model)


def test_flags_select_kernels(tiny, torch_ops, kit):
    model = tiny("llama")
    patch_liger_kernel(model, ops=torch_ops, rope=False, swiglu=False, fused_linear_cross_entropy=False)
    try:
        patched = {type(m).__name__ for m in model.modules() if "forward" in vars(m)}
        assert patched == {"LlamaRMSNorm"}
    finally:
        unpatch_liger_kernel(model)


def test_rope_copy_reads_module_globals_live(tiny, torch_ops, monkeypatch, kit):
    from transformers.models.llama import modeling_llama

    model = tiny("llama")
    patch_liger_kernel(model, ops=torch_ops, rms_norm=False, swiglu=False, fused_linear_cross_entropy=False)
    try:
        attn = model.model.layers[0].self_attn
        seen = []
        real = modeling_llama.eager_attention_forward
        monkeypatch.setattr(
            modeling_llama, "eager_attention_forward", lambda *a, **k: seen.append(1) or real(*a, **k)
        )
        model.config._attn_implementation = "eager"
        with torch.no_grad():
            model(IDS)
        assert len(seen) == 2  # a later change of the module is visible to the copied forward
        assert (
            modeling_llama.apply_rotary_pos_emb
            is inspect.unwrap(attn.forward.__func__).__globals__._module_globals["apply_rotary_pos_emb"]
        )
    finally:
        model.config._attn_implementation = "sdpa"
        unpatch_liger_kernel(model)


def test_idempotent_and_conflicting_options(tiny, torch_ops, kit):
    model = tiny("llama")
    patch_liger_kernel(model, ops=torch_ops)
    try:
        state = kit.instance_state(model)
        patch_liger_kernel(model, ops=torch_ops)
        kit.assert_same_state(state, kit.instance_state(model))
        with pytest.raises(ValueError, match="already Liger-patched"):
            patch_liger_kernel(model, ops=torch_ops, rope=False)
    finally:
        unpatch_liger_kernel(model)
    unpatch_liger_kernel(model)  # no-op when not patched


def test_bad_input(tiny, torch_ops, kit):
    model = tiny("llama")
    with pytest.raises(ValueError, match="exclusive"):
        patch_liger_kernel(model, ops=torch_ops, cross_entropy=True)
    with pytest.raises(TypeError, match="rope must be a bool"):
        patch_liger_kernel(model, ops=torch_ops, rope="yes")
    with pytest.raises(TypeError, match="unexpected keyword"):
        patch_liger_kernel(model, ops=torch_ops, layer_norm=True)
    with pytest.raises(TypeError, match="config"):
        patch_liger_kernel(torch.nn.Linear(2, 2), ops=torch_ops)
    model.config.model_type = "gpt2"
    with pytest.raises(ValueError, match="'gpt2'.*supported: " + ", ".join(supported_model_types())):
        patch_liger_kernel(model, ops=torch_ops)
    model.config.model_type = "llama"
    assert get_liger_kernel_patch(model) is None


def test_unsupported_activation_raises_before_any_change(tiny, torch_ops, kit):
    model = tiny("llama", hidden_act="gelu")
    before = kit.instance_state(model)
    with pytest.raises(ValueError, match="hidden_act is 'gelu'"):
        patch_liger_kernel(model, ops=torch_ops)
    kit.assert_same_state(before, kit.instance_state(model))
    patch_liger_kernel(model, ops=torch_ops, swiglu=False)  # the rest still applies
    unpatch_liger_kernel(model)


def _norm_with_fixed_eps(self, hidden_states):
    # A transformers version whose norm no longer reads its epsilon attribute.
    x = hidden_states.float()
    return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 0.1)).to(hidden_states.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_that_ignores_its_epsilon_attribute_is_refused(tiny, torch_ops, kit, monkeypatch, dtype):
    model = tiny("llama").to(dtype)
    monkeypatch.setattr(type(model.model.norm), "forward", _norm_with_fixed_eps)
    before = kit.instance_state(model)
    with pytest.raises(
        RuntimeError, match=r"does not compute x / sqrt\(mean\(x\^2\) \+ eps\).*variance_epsilon"
    ):
        patch_liger_kernel(model, ops=torch_ops)
    kit.assert_same_state(before, kit.instance_state(model))
    patch_liger_kernel(model, ops=torch_ops, rms_norm=False)  # the rest still applies
    unpatch_liger_kernel(model)


def test_norm_epsilon_is_found_by_attribute_and_two_disagreeing_ones_are_refused(tiny, torch_ops, kit):
    model = tiny("llama")
    for norm in _by_class(model, "LlamaRMSNorm"):
        # Renamed under a forward that still reads the old name (Llama4's moved from `eps` in 5.25).
        norm.eps = norm.__dict__.pop("variance_epsilon")
    with pytest.raises(RuntimeError, match="a probe call failed"):
        patch_liger_kernel(model, ops=torch_ops)
    for norm in _by_class(model, "LlamaRMSNorm"):
        norm.variance_epsilon = norm.eps
    patch_liger_kernel(model, ops=torch_ops)  # both present and equal: exact, so patched
    unpatch_liger_kernel(model)
    model.model.norm.eps = 1e-3
    before = kit.instance_state(model)
    with pytest.raises(RuntimeError, match="expected one float epsilon attribute"):
        patch_liger_kernel(model, ops=torch_ops)
    kit.assert_same_state(before, kit.instance_state(model))


def test_model_on_the_meta_device_is_patched_before_its_weights_load(torch_ops, kit):
    # The norm's probe runs on a CPU stand-in of the module: a model built on meta (weights loaded later)
    # is checked and patched like a materialized one.
    import transformers

    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kit.TINY))
    patch_liger_kernel(model, ops=torch_ops)
    assert model.model.norm._get_name() == "LigerRMSNorm"
    unpatch_liger_kernel(model)


def test_base_model_without_head(torch_ops, kit):
    import transformers

    model = transformers.LlamaModel(transformers.LlamaConfig(**kit.TINY))
    with pytest.raises(ValueError, match="LlamaForCausalLM head"):
        patch_liger_kernel(model, ops=torch_ops)
    patch_liger_kernel(model, ops=torch_ops, fused_linear_cross_entropy=False)
    assert model.norm._get_name() == "LigerRMSNorm"
    unpatch_liger_kernel(model)
    assert "forward" not in vars(model.norm)


@pytest.mark.parametrize("loss", ["fused_linear_cross_entropy", "cross_entropy"])
def test_deepcopy_of_patched_model_computes_with_its_own_modules(tiny, torch_ops, kit, loss):
    # Pipeline splitting deep-copies a patched model: every copy must run on its own weights.
    model = tiny("llama")
    pristine_keys = {path: state.keys() for path, state in kit.instance_state(model).items()}
    options = {
        "fused_linear_cross_entropy": loss == "fused_linear_cross_entropy",
        "cross_entropy": loss == "cross_entropy",
    }
    patch_liger_kernel(model, ops=torch_ops, **options)
    try:
        clone = copy.deepcopy(model)
        originals = {id(m) for m in model.modules()}
        bound = 0
        for path, module in clone.named_modules():
            for attr, value in vars(module).items():
                if patch_name(value) is None:
                    continue
                func = value
                if attr in ("forward", "_get_name"):
                    assert isinstance(value, types.MethodType) and value.__self__ is module, (path, attr)
                    func, bound = value.__func__, bound + 1
                cells = [c.cell_contents for c in getattr(func, "__closure__", None) or ()]
                assert not [c for c in cells if id(c) in originals], (path, attr)
        # 5 norms + 2 MLPs + 2 attentions, forward and _get_name each, plus the head's.
        assert bound == 2 * 9 + (2 if loss == "fused_linear_cross_entropy" else 1)

        # Different weights in the copy, so computing with the original's would change every number.
        torch.manual_seed(1)
        with torch.no_grad():
            for p in clone.parameters():
                p.add_(0.05 * torch.randn_like(p))
        ref = kit.build_tiny("llama")
        ref.load_state_dict(clone.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(clone(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        clone.train(), ref.train()
        out, expected = clone(IDS, labels=IDS), ref(IDS, labels=IDS)
        torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        expected.loss.backward()
        for (name, p), q in zip(clone.named_parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        assert all(p.grad is None for p in model.parameters())

        # The copy carries its own handle, whose patches target the copy's modules.
        handle = get_liger_kernel_patch(clone)
        assert handle is not None and handle is not get_liger_kernel_patch(model)
        assert all(p.is_live() for p in handle.patches)
        assert unpatch_liger_kernel(clone) is clone
        assert {path: state.keys() for path, state in kit.instance_state(clone).items()} == pristine_keys
        assert get_liger_kernel_patch(clone) is None and "forward" not in vars(clone.model.norm)
        assert get_liger_kernel_patch(model) is not None  # the original stays patched
        assert model.model.norm.forward.__self__ is model.model.norm
    finally:
        unpatch_liger_kernel(model)


@pytest.mark.parametrize("how", ["pickle", "torch.save"])
def test_pickled_patched_model_loads_plain_and_can_be_patched_again(tiny, torch_ops, kit, how):
    # pickle keeps weights, not kernels: the loaded copy must run its own weights and not claim a patch
    # it no longer runs (a stale handle made patch_liger_kernel a silent no-op on it)
    import io
    import pickle

    model = tiny("llama")
    patch_liger_kernel(model, ops=torch_ops)
    try:
        if how == "pickle":
            clone = pickle.loads(pickle.dumps(model))
        else:
            buffer = io.BytesIO()
            torch.save(model, buffer)
            buffer.seek(0)
            clone = torch.load(buffer, weights_only=False)
        assert get_liger_kernel_patch(clone) is None and get_patch_report(clone).modules == ()
        with torch.no_grad():
            for p in clone.parameters():
                p.mul_(0.5)
        ref = kit.build_tiny("llama")
        ref.load_state_dict(clone.state_dict())
        with torch.no_grad():
            torch.testing.assert_close(clone(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        patch_liger_kernel(clone, ops=torch_ops)
        assert len(get_patch_report(clone).modules) == len(get_patch_report(model).modules) > 0
        with torch.no_grad():
            torch.testing.assert_close(clone(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
        unpatch_liger_kernel(clone)
        assert get_patch_report(clone).modules == ()
        assert len(get_patch_report(model).modules) > 0  # the original stays patched
    finally:
        unpatch_liger_kernel(model)


def test_patch_over_a_foreign_forward_wrapper_keeps_its_signature(tiny, torch_ops, kit):
    from torch.nn.attention import SDPBackend

    from am_kernels import patch_sdpa_backends, unpatch_sdpa_backends

    model, ref = tiny("llama"), tiny("llama")
    pristine = kit.instance_state(model)
    patch_sdpa_backends(model, [SDPBackend.MATH])
    wrapper = model.forward  # a closure, not a method: the replacement shows its signature explicitly
    patch_liger_kernel(model, ops=torch_ops)
    try:
        assert_same_signature(wrapper, model.forward)
        assert model.forward.__self__ is model
        with torch.no_grad():  # eval goes through the sdpa wrapper into transformers' forward
            torch.testing.assert_close(model(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    finally:
        unpatch_liger_kernel(model)
    assert vars(model)["forward"] is wrapper
    unpatch_sdpa_backends(model)
    kit.assert_same_state(pristine, kit.instance_state(model))


def _owned_by(name, returns):
    """An instance forward marked as another am-* package's, as am-pipelining installs one per stage."""
    from am_kernels._patch import mark

    def forward(*args, **kwargs):
        return returns

    return mark(forward, name)


@pytest.mark.parametrize(
    ("where", "marker"),
    [("model", "am_pipelining.pipeline_forward_inner"), ("", "am_pipelining.pipeline_forward_outer")],
    ids=["base-model", "head"],
)
def test_fused_loss_names_another_am_forward_in_the_way(tiny, torch_ops, kit, where, marker):
    model = tiny("llama")
    target = model.get_submodule(where)
    target.forward = _owned_by(marker, torch.zeros(1))
    pristine = kit.instance_state(model)
    with pytest.raises(
        ValueError, match=rf"owned by the am_pipelining patch '{marker}'.*fused_linear_cross_entropy=False"
    ):
        patch_liger_kernel(model, ops=torch_ops)
    kit.assert_same_state(pristine, kit.instance_state(model))
    # The other kernels still apply.
    patch_liger_kernel(model, ops=torch_ops, fused_linear_cross_entropy=False)
    assert model.model.norm._get_name() == "LigerRMSNorm" and patch_name(vars(target)["forward"]) == marker
    unpatch_liger_kernel(model)
    kit.assert_same_state(pristine, kit.instance_state(model))
    del target.forward


@pytest.mark.parametrize(
    ("path", "flag"),
    [("model.layers.0.self_attn", "rope"), ("model.norm", "rms_norm"), ("model.layers.1.mlp", "swiglu")],
)
def test_kernels_that_replace_the_whole_forward_refuse_an_instance_forward(tiny, torch_ops, kit, path, flag):
    from torch.nn.attention import SDPBackend

    from am_kernels import patch_sdpa_backends, unpatch_sdpa_backends

    model = tiny("llama")
    module = model.get_submodule(path)
    patch_sdpa_backends(module, [SDPBackend.MATH])
    pristine = kit.instance_state(model)
    try:
        with pytest.raises(ValueError, match=rf"{path} .*am_kernels.sdpa_backends.*{flag}=False"):
            patch_liger_kernel(model, ops=torch_ops)  # before: the pin was silently replaced
        kit.assert_same_state(pristine, kit.instance_state(model))
    finally:
        unpatch_sdpa_backends(module)


@pytest.fixture
def fresh_rope_kernel():
    from am_kernels import liger_forwards

    liger_forwards._rope_kernel.cache_clear()
    yield liger_forwards._rope_kernel
    liger_forwards._rope_kernel.cache_clear()


def test_rope_calls_liger_triton_function_directly_not_its_compiler_disabled_dispatch(
    fresh_rope_kernel, monkeypatch
):
    """liger-kernel's `liger_rotary_pos_emb` goes through `dispatch` (under torch.compiler.disable, a graph
    break per layer); the ops call its autograd function with the same arguments instead."""
    rope_module = pytest.importorskip("liger_kernel.ops.rope")
    calls = []

    def apply(*args):
        calls.append(args)
        return args[0], args[1]

    monkeypatch.setattr(rope_module.LigerRopeFunction, "apply", apply)
    rope = fresh_rope_kernel()
    q, k, cos, sin = (torch.randn(1, 2, 4, 8) for _ in range(4))
    assert rope(q, k, cos, sin, None, 2) == (q, k)
    assert len(calls) == 1 and calls[0][:4] == (q, k, cos, sin) and calls[0][4:] == (None, 2)
    assert load_liger_ops().rotary_pos_emb is rope


def test_rope_falls_back_to_liger_public_function_when_the_autograd_function_changed(
    fresh_rope_kernel, monkeypatch
):
    rope_module = pytest.importorskip("liger_kernel.ops.rope")
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    class Renamed(torch.autograd.Function):
        @staticmethod
        def forward(ctx, query, key, cos, sin, position_ids=None, unsqueeze_dim=1):
            raise AssertionError("not called")

    monkeypatch.setattr(rope_module, "LigerRopeFunction", Renamed)
    assert fresh_rope_kernel() is liger_rotary_pos_emb
