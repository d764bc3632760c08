import importlib.util
import subprocess
import sys

import pytest

import am_kernels
from am_kernels import HAS_LIGER_KERNEL, patch_liger_kernel
from am_kernels.availability import require_liger_kernel


def test_flag_matches_find_spec():
    assert HAS_LIGER_KERNEL is (importlib.util.find_spec("liger_kernel") is not None)


def test_import_touches_no_extra_no_model_module_and_no_cuda():
    code = (
        "import sys, torch, am_kernels\n"
        "assert 'liger_kernel' not in sys.modules, 'liger imported'\n"
        "assert not [m for m in sys.modules if m.startswith('transformers.models.')], 'model module imported'\n"
        "assert not torch.cuda.is_initialized()\n"
        "print(sorted(am_kernels.__all__) == sorted(set(am_kernels.__all__)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


def test_missing_liger_raises_import_error_with_install_line(monkeypatch, tiny):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "liger_kernel" else real(name, *a)
    )
    with pytest.raises(ImportError, match=r'pip install "am-kernels\[liger\]"'):
        require_liger_kernel()
    model = tiny("llama")
    with pytest.raises(ImportError, match=r'pip install "am-kernels\[liger\]"'):
        patch_liger_kernel(model)
    assert am_kernels.get_liger_kernel_patch(model) is None
