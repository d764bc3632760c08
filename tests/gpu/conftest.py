"""GPU test session setup.

liger-kernel is imported before anything can import transformer-engine: on the GPU image we use (torch 2.11
with its own cuDNN, TE 2.20 from wheels), importing TE first makes the loader resolve the system
``libcudnn_*.so.9`` and a later liger-kernel import fails with an undefined cuDNN symbol. The benchmarks
import in this order already (Liger is applied before TE attention).
"""

import importlib.util

if importlib.util.find_spec("liger_kernel") is not None:
    import liger_kernel.transformers  # noqa: F401
