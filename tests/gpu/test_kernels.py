"""GPU tests of am-kernels: Liger-patched training matches unpatched; SDPA pinning selects the backend.

pytest tests/gpu/test_kernels.py -m gpu
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend

from am_cli.tiny_models import build_config, build_model
from am_kernels import (
    HAS_LIGER_KERNEL,
    get_patch_report,
    patch_liger_kernel,
    patch_sdpa_backends,
    unpatch_liger_kernel,
    unpatch_sdpa_backends,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
needs_liger = pytest.mark.skipif(
    not HAS_LIGER_KERNEL, reason='needs liger-kernel: pip install "am-kernels[liger]"'
)

# am-cli's built-in tiny models (am_cli.tiny_models) at GPU-test size; the extras keep each model's own
# defaults where the built-in differs (Mistral's 4096 window, Gemma3's tied head and 1/256 scaling, ...).
SIZES = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=256,
)
ARCHS = {
    "llama": ("llama", {}),
    "qwen2": ("qwen2", {}),
    "qwen3": ("qwen3", {}),
    "mistral": ("mistral", {"sliding_window": 4096}),
    "gemma3_text": (
        "gemma3",
        {
            "sliding_window": 64,
            "tie_word_embeddings": True,
            "query_pre_attn_scalar": 256,
            "layer_types": ["sliding_attention", "sliding_attention"],
        },
    ),
}


def build(model_type: str, dtype=torch.bfloat16, attn: str = "sdpa"):
    name, extra = ARCHS[model_type]
    model = build_model(build_config(name, **{**SIZES, **extra}), attn_implementation=attn, seed=0)
    with torch.no_grad():
        for module in model.modules():
            if type(module).__name__.endswith("RMSNorm"):
                module.weight.normal_(0.0, 0.3)
    return model.to("cuda", dtype)


@needs_liger
@pytest.mark.parametrize("model_type", list(ARCHS))
def test_liger_training_step_matches_unpatched(model_type):
    ref, model = build(model_type), build(model_type)
    patch_liger_kernel(model)
    try:
        assert get_patch_report(model).counts()["am_kernels.liger.rope"] == 2
        ids = torch.randint(0, SIZES["vocab_size"], (2, 128), device="cuda")
        labels = ids.clone()
        labels[:, :5] = -100
        with torch.no_grad():
            ref.eval(), model.eval()
            # bf16: rounding differs between fused and unfused kernels by a few ulp per layer.
            torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=3e-2, atol=3e-2)
        ref.train(), model.train()
        out, expected = model(ids, labels=labels), ref(ids, labels=labels)
        assert out.logits is None  # fused linear cross entropy never materialises the logits
        torch.testing.assert_close(out.loss.float(), expected.loss.float(), rtol=1e-2, atol=1e-2)
        out.loss.backward()
        expected.loss.backward()
        for (name, p), q in zip(model.named_parameters(), ref.parameters()):
            cos = torch.nn.functional.cosine_similarity(
                p.grad.float().flatten(), q.grad.float().flatten(), dim=0
            )
            assert cos > 0.99, (name, float(cos))
            torch.testing.assert_close(p.grad.float().norm(), q.grad.float().norm(), rtol=5e-2, atol=1e-3)
    finally:
        unpatch_liger_kernel(model)
    assert not get_patch_report(model)


def _sdpa_call(x):
    return torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True)


class Attn(torch.nn.Module):
    def forward(self, x):
        return _sdpa_call(x)


def test_sdpa_pin_selects_the_requested_backend():
    module = Attn()
    x32 = torch.randn(1, 4, 64, 64, device="cuda", dtype=torch.float32)
    x16 = x32.to(torch.bfloat16)
    # FLASH_ATTENTION has no fp32 kernel: pinning to it alone must fail, proving the pin is in force.
    patch_sdpa_backends(module, [SDPBackend.FLASH_ATTENTION])
    try:
        with pytest.raises(RuntimeError):
            module(x32)
        module(x16)  # bf16 is supported by flash
    finally:
        unpatch_sdpa_backends(module)
    module(x32)  # unpatched: torch picks a backend that supports fp32
    patch_sdpa_backends(module, [SDPBackend.MATH])
    try:
        with torch.nn.attention.sdpa_kernel([SDPBackend.MATH]):
            expected = _sdpa_call(x32)
        torch.testing.assert_close(module(x32), expected, rtol=0, atol=0)
    finally:
        unpatch_sdpa_backends(module)


def test_sdpa_pin_on_a_tiny_llama():
    model = build("llama", dtype=torch.float32).eval()
    ids = torch.randint(0, SIZES["vocab_size"], (1, 64), device="cuda")
    with torch.no_grad():
        ref = model(ids).logits
        patch_sdpa_backends(model, [SDPBackend.FLASH_ATTENTION])
        try:
            with pytest.raises(RuntimeError):
                model(ids)
        finally:
            unpatch_sdpa_backends(model)
        patch_sdpa_backends(model)  # default CUDNN, FLASH, EFFICIENT, MATH: some backend takes fp32
        try:
            torch.testing.assert_close(model(ids).logits, ref, rtol=1e-4, atol=1e-4)
        finally:
            unpatch_sdpa_backends(model)
