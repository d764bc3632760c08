"""Optional-extra detection. Nothing here imports liger-kernel."""

from __future__ import annotations

import importlib.util

#: True when liger-kernel is importable; found with `find_spec`, so liger-kernel is never imported here.
HAS_LIGER_KERNEL: bool = importlib.util.find_spec("liger_kernel") is not None

LIGER_INSTALL_LINE = 'pip install "am-kernels[liger]"'


def require_liger_kernel() -> None:
    """Raise ImportError with the install line when liger-kernel is not installed."""
    # Looked up at call time (not the import-time flag) so an install after import is seen.
    if importlib.util.find_spec("liger_kernel") is None:
        raise ImportError(f"liger-kernel is not installed; install it with: {LIGER_INSTALL_LINE}")
