import json

from torch.nn.attention import SDPBackend

from am_kernels import (
    get_patch_report,
    patch_liger_kernel,
    patch_sdpa_backends,
    unpatch_liger_kernel,
    unpatch_sdpa_backends,
)


def test_report_lists_each_patched_module(tiny, torch_ops):
    model = tiny("qwen3")
    assert not get_patch_report(model)
    assert get_patch_report(model).format() == "Qwen3ForCausalLM: no am-* patches"
    patch_liger_kernel(model, ops=torch_ops, fused_linear_cross_entropy=False)
    patch_sdpa_backends(model.model.layers[0].self_attn, [SDPBackend.MATH])
    try:
        report = get_patch_report(model)
        paths = {m.path: m for m in report.modules}
        # 2 layers x (2 norms + q_norm + k_norm) + final norm = 9 norms, 2 MLPs, 2 attentions.
        assert report.counts() == {
            "am_kernels.liger.rms_norm": 9,
            "am_kernels.liger.rope": 2,
            "am_kernels.liger.swiglu": 2,
            "am_kernels.sdpa_backends": 1,
        }
        assert paths["model.norm"].shown_as == "LigerRMSNorm"
        assert paths["model.norm"].class_name == "Qwen3RMSNorm"
        assert dict(paths["model.layers.0.mlp"].patches) == {
            "_get_name": "am_kernels.liger.swiglu",
            "forward": "am_kernels.liger.swiglu",
        }
        assert paths["model.layers.0.self_attn"].kernels == (
            "am_kernels.liger.rope",
            "am_kernels.sdpa_backends",
        )
        data = json.loads(json.dumps(report.to_dict()))
        assert data["counts"] == report.counts() and len(data["modules"]) == len(report.modules)
        text = report.format()
        assert "model.layers.1.mlp: Qwen3MLP -> LigerSwiGLUMLP [_get_name, forward]" in text
    finally:
        unpatch_sdpa_backends(model.model.layers[0].self_attn)
        unpatch_liger_kernel(model)
    assert not get_patch_report(model)
