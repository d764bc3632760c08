"""Every LIGER_PLANS row on a tiny model built from its config class's defaults, shrunk: patched == plain.

For each row: the patched modules are counted, undo restores the exact objects, the numbers (eval logits,
training loss and gradients) match the unpatched model with the pure-torch LigerOps, each norm is bitwise
equal in bf16 (so the casting mode is the one transformers uses), and every kernel the row cannot express
is refused with its reason.
"""

import copy
import re
import warnings

import pytest
import torch
import transformers
from transformers import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from am_kernels import LIGER_PLANS, get_patch_report, patch_liger_kernel, unpatch_liger_kernel
from am_kernels.liger import kernel_refusals
from am_kernels.liger_plans import REFUSED

IDS = (torch.arange(32).reshape(2, 16) * 11) % 128

# Size fields of config classes, shrunk; each is set only where the class has it.
SHRINK = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    max_position_embeddings=64,
    moe_intermediate_size=32,
    shared_expert_intermediate_size=32,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=4,
    num_experts_per_tok=2,
    n_group=1,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    linear_num_key_heads=2,
    linear_num_value_heads=2,
    linear_key_head_dim=8,
    linear_value_head_dim=8,
    sliding_window=8,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# What the defaults leave out at this size: a layer of each kind where the architecture mixes kinds.
EXTRA = {
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"]},
    "qwen3_5_moe_text": {"layer_types": ["linear_attention", "full_attention"]},
    "smollm3": {"no_rope_layers": [1, 0]},
    "exaone4": {"layer_types": ["sliding_attention", "full_attention"]},
    "qwen3_moe": {"mlp_only_layers": [0]},
    # MLA expands the latent to every head: no grouped K/V.
    "deepseek_v3": {"first_k_dense_replace": 1, "num_key_value_heads": 4},
    "deepseek_v2": {"first_k_dense_replace": 1, "num_key_value_heads": 4},
}


def tiny_config(model_type):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")
    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = cls()
        kwargs = {k: v for k, v in SHRINK.items() if hasattr(defaults, k)}
        config = cls(**{**kwargs, **EXTRA.get(model_type, {})})
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type, seed=0):
    config = tiny_config(model_type)
    name = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)
    if name is None or not hasattr(transformers, name):
        pytest.skip(f"{model_type} has no causal LM class in transformers {transformers.__version__}")
    torch.manual_seed(seed)
    model = getattr(transformers, name)(config)
    plan = LIGER_PLANS[model_type]
    with torch.no_grad():  # random norm weights, so offset and casting mistakes change the numbers
        for module in model.modules():
            if type(module).__name__ == plan.norm_class:
                module.weight.normal_(0.0, 0.3)
    return model.eval()


def test_at_least_25_rows_and_every_liger_model_type_is_covered():
    assert len(LIGER_PLANS) >= 25
    assert not set(LIGER_PLANS) & set(REFUSED)
    liger = pytest.importorskip("liger_kernel.transformers.monkey_patch")
    uncovered = []
    for model_type in liger.MODEL_TYPE_TO_APPLY_LIGER_FN:
        if model_type in LIGER_PLANS or model_type in REFUSED:
            continue
        # A vision-language wrapper is covered through its text model's row.
        text = (
            getattr(CONFIG_MAPPING[model_type](), "text_config", None)
            if model_type in CONFIG_MAPPING
            else None
        )
        if getattr(text, "model_type", None) not in LIGER_PLANS:
            uncovered.append(model_type)
    assert not uncovered, uncovered


@pytest.mark.parametrize("model_type", sorted(REFUSED))
def test_refused_model_types_name_the_type_and_reason(model_type, torch_ops):
    class Stub(torch.nn.Module):
        config = type("Config", (), {"model_type": model_type})()

    with pytest.raises(ValueError, match=rf"model_type '{model_type}': {re.escape(REFUSED[model_type])}"):
        patch_liger_kernel(Stub(), ops=torch_ops)


def _counts(model, plan, options):
    by_class = {}
    for module in model.modules():
        by_class[type(module).__name__] = by_class.get(type(module).__name__, 0) + 1
    return {
        "am_kernels.liger.rms_norm": by_class.get(plan.norm_class, 0) if options["rms_norm"] else 0,
        f"am_kernels.liger.{plan.mlp_kind}": by_class.get(plan.mlp_class, 0) if options["swiglu"] else 0,
        "am_kernels.liger.rope": by_class.get(plan.attention_class, 0) if options["rope"] else 0,
    }


@pytest.mark.parametrize("model_type", sorted(LIGER_PLANS))
def test_row_is_exact_on_a_tiny_model(model_type, torch_ops, kit):
    plan = LIGER_PLANS[model_type]
    ref, model = tiny_model(model_type), tiny_model(model_type)
    refusals = kernel_refusals(model_type, plan, model.config)
    pristine = kit.instance_state(model)

    # Every kernel the row (or this config) cannot express is refused by name, before anything changes.
    for kernel, reason in refusals.items():
        flags = (
            {kernel: True}
            if kernel != "cross_entropy"
            else {kernel: True, "fused_linear_cross_entropy": False}
        )
        with pytest.raises(
            ValueError,
            match=rf"{kernel}=True is not exact for model_type '{model_type}': {re.escape(reason)}",
        ):
            patch_liger_kernel(model, ops=torch_ops, **flags)
        kit.assert_same_state(pristine, kit.instance_state(model))

    fused = "fused_linear_cross_entropy" not in refusals
    patch_liger_kernel(model, ops=torch_ops, fused_linear_cross_entropy=fused, cross_entropy=not fused)
    try:
        options = {k: k not in refusals for k in ("rms_norm", "swiglu", "rope")}
        counts = get_patch_report(model).counts()
        expected = _counts(model, plan, options)
        for marker, count in expected.items():
            got = counts.get(marker, 0)
            if marker.endswith("rope") and plan.rope_optional:
                assert 0 < got < count, (marker, got, count)  # the tiny configs have one NoPE layer
            else:
                assert got == count, (marker, got, count)
        assert sum(expected.values()) > 0 or not any(options.values())
        loss_marker = "fused_linear_cross_entropy" if fused else "cross_entropy"
        assert counts.get(f"am_kernels.liger.{loss_marker}") == 1

        with torch.no_grad():
            torch.testing.assert_close(
                model(IDS, use_cache=False).logits, ref(IDS, use_cache=False).logits, rtol=1e-5, atol=1e-5
            )
        model.train(), ref.train()
        out, expected_out = model(IDS, labels=IDS, use_cache=False), ref(IDS, labels=IDS, use_cache=False)
        torch.testing.assert_close(out.loss, expected_out.loss, rtol=1e-5, atol=1e-6)
        out.loss.backward()
        expected_out.loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            if q.grad is None:
                assert p.grad is None, name
            else:
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)

        # In bf16 each norm computes bit for bit what transformers' does (the casting mode is right).
        ref_modules = dict(ref.named_modules())
        x = torch.randn(2, 3, model.config.hidden_size, dtype=torch.bfloat16)
        for path, module in model.named_modules():
            if type(module).__name__ == plan.norm_class and options["rms_norm"]:
                ours, theirs = copy.deepcopy(module).bfloat16(), copy.deepcopy(ref_modules[path]).bfloat16()
                width = ours.weight.shape[-1]
                with torch.no_grad():
                    torch.testing.assert_close(ours(x[..., :width]), theirs(x[..., :width]), rtol=0, atol=0)
    finally:
        unpatch_liger_kernel(model)
        model.eval()
    kit.assert_same_state(pristine, kit.instance_state(model))


@pytest.mark.parametrize("model_type", ["qwen3_moe", "mixtral"])
def test_fused_loss_falls_back_when_the_router_loss_is_asked_for(model_type, torch_ops):
    # MoE heads add the router's auxiliary loss; the fused path does not compute it, so it steps aside.
    ref, model = tiny_model(model_type), tiny_model(model_type)
    patch_liger_kernel(model, ops=torch_ops)
    try:
        model.train(), ref.train()
        for kwargs in ({"output_router_logits": True}, {}):
            out = model(IDS, labels=IDS, use_cache=False, **kwargs)
            expected = ref(IDS, labels=IDS, use_cache=False, **kwargs)
            torch.testing.assert_close(out.loss, expected.loss, rtol=1e-5, atol=1e-6)
            assert (out.logits is None) is not bool(kwargs)  # fused (no logits) only without the router loss
    finally:
        unpatch_liger_kernel(model)
