from ._contract import require_installed

__version__ = "0.1.0"

# Checked when the package is imported: the private transformers objects we patch exist from 5.3 on.
require_installed("am-kernels", "5.3")
