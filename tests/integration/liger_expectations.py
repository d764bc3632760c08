"""What am_kernels' Liger patch must replace on each built-in tiny model (4 decoder layers)."""

from __future__ import annotations

import pytest
import torch

from am_kernels import get_liger_kernel_patch, get_patch_report, patch_liger_kernel, unpatch_liger_kernel

_LAYERS = 4
_PREFIX = "am_kernels.liger."
# Modules per kernel, counted from the architectures: llama-like decoders have 2 RMSNorms per layer plus
# the final norm; Qwen3 adds per-head q_norm/k_norm (4 per layer); Gemma3 has 4 layer norms + q/k norms
# (6 per layer) and a GEGLU MLP. RoPE is patched on every attention module, the fused CE on the LM head.
LIGER_EXPECTED: dict[str, dict[str, int]] = {
    "llama": {
        "rms_norm": 2 * _LAYERS + 1,
        "rope": _LAYERS,
        "swiglu": _LAYERS,
        "fused_linear_cross_entropy": 1,
    },
    "qwen2": {
        "rms_norm": 2 * _LAYERS + 1,
        "rope": _LAYERS,
        "swiglu": _LAYERS,
        "fused_linear_cross_entropy": 1,
    },
    "mistral": {
        "rms_norm": 2 * _LAYERS + 1,
        "rope": _LAYERS,
        "swiglu": _LAYERS,
        "fused_linear_cross_entropy": 1,
    },
    "qwen3": {
        "rms_norm": 4 * _LAYERS + 1,
        "rope": _LAYERS,
        "swiglu": _LAYERS,
        "fused_linear_cross_entropy": 1,
    },
    "gemma3": {
        "rms_norm": 6 * _LAYERS + 1,
        "rope": _LAYERS,
        "geglu": _LAYERS,
        "fused_linear_cross_entropy": 1,
    },
    # The Mistral3 VLM's language model is a Mistral: its norms/MLPs/RoPE are patched, the Pixtral vision
    # tower's are not (other classes); the fused CE would patch MistralForCausalLM's head, which a VLM has not.
    "mistral3": {"rms_norm": 2 * _LAYERS + 1, "rope": _LAYERS, "swiglu": _LAYERS},
}
LIGER_OPTIONS: dict[str, dict[str, bool]] = {
    arch: {"fused_linear_cross_entropy": "fused_linear_cross_entropy" in counts}
    for arch, counts in LIGER_EXPECTED.items()
}
# No Liger plan: the error must name the model type (and leave the model untouched).
LIGER_UNSUPPORTED: dict[str, str] = {"gemma4": "gemma4_text", "qwen2-vl": "qwen2_vl"}


def check_liger_report_and_undo(model: torch.nn.Module, arch: str) -> None:
    """Patch `model` with Liger, assert the report lists the expected modules, revert, assert nothing is left."""
    originals = {name: dict(vars(module)) for name, module in model.named_modules()}
    if arch in LIGER_UNSUPPORTED:
        with pytest.raises(ValueError, match=LIGER_UNSUPPORTED[arch]):
            patch_liger_kernel(model)
    else:
        patch_liger_kernel(model, **LIGER_OPTIONS[arch])
        report = get_patch_report(model)
        counts = {k.removeprefix(_PREFIX): v for k, v in report.counts().items()}
        assert counts == LIGER_EXPECTED[arch], report.format()
        patched = {m.path for m in report.modules}
        names = dict(model.named_modules())
        assert patched <= set(names)
        # Only language-model modules: nothing in a vision tower or projector.
        assert not [p for p in patched if "vision" in p or "visual" in p or "projector" in p]
        unpatch_liger_kernel(model)
    assert get_liger_kernel_patch(model) is None
    assert not get_patch_report(model)
    for name, module in model.named_modules():
        current = vars(module)
        assert current.keys() == originals[name].keys(), name
        assert all(current[k] is originals[name][k] for k in current), name
