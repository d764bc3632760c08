"""am_kernels' Liger patch on every built-in tiny model: the whole model and the pipeline stages.

On CPU Liger's Triton kernels cannot execute, so these tests patch, check the report and revert; the
CUDA run of test_training_step keeps the patch applied through the training step.
"""

from __future__ import annotations

import integration_stack as stack
import pytest
from liger_expectations import LIGER_EXPECTED, check_liger_report_and_undo

from am_cli.tiny_models import build_model
from am_kernels import HAS_LIGER_KERNEL, get_patch_report, patch_liger_kernel, unpatch_liger_kernel
from am_pipelining import split_model_into_stages

pytestmark = pytest.mark.skipif(not HAS_LIGER_KERNEL, reason="liger-kernel is not installed")


@pytest.mark.parametrize("arch", stack.arch_params())
def test_liger_report_and_undo_on_whole_model(arch: str) -> None:
    check_liger_report_and_undo(build_model(stack.stack_config(arch)), arch)


@pytest.mark.parametrize("arch", stack.arch_params(LIGER_EXPECTED))
def test_liger_on_pipeline_stages_covers_each_owned_module_once(arch: str) -> None:
    """Patching each stage after the split: together the stages hold every norm/MLP/attention exactly once."""
    stages = split_model_into_stages(build_model(stack.stack_config(arch)), 2)
    total: dict[str, int] = {}
    try:
        for stage in stages:
            patch_liger_kernel(stage, fused_linear_cross_entropy=False)
            report = get_patch_report(stage)
            owned = dict(stage.named_modules())
            for module in report.modules:
                assert module.path in owned
            for key, count in report.counts().items():
                if key.startswith("am_kernels.liger."):
                    name = key.removeprefix("am_kernels.liger.")
                    total[name] = total.get(name, 0) + count
    finally:
        for stage in stages:
            unpatch_liger_kernel(stage)
    expected = {k: v for k, v in LIGER_EXPECTED[arch].items() if k != "fused_linear_cross_entropy"}
    assert total == expected
    for stage in stages:
        assert not [k for k in get_patch_report(stage).counts() if k.startswith("am_kernels.")]
