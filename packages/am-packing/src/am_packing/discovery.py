"""Which transformers modeling modules build their masks with `create_causal_mask`.

Modeling modules do ``from ...masking_utils import create_causal_mask`` and so hold their own reference
to the function; patching ``masking_utils`` alone reaches only modules imported afterwards. Discovery
reads the source files of ``transformers/models/*/modeling_*.py`` (it never imports them) and lists
those that import one of the mask builders we replace.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from ._originals import MASK_BUILDERS

__all__ = ["MASK_BUILDERS", "PACKING_PATCH_MODULES", "find_causal_mask_modules", "get_packing_modules"]

# The seed's module list; kept public because downstream code refers to it.
PACKING_PATCH_MODULES: tuple[str, ...] = (
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.qwen3.modeling_qwen3",
    "transformers.models.qwen2_vl.modeling_qwen2_vl",
    "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl",
    "transformers.models.qwen3_5.modeling_qwen3_5",
    "transformers.models.qwen3_vl.modeling_qwen3_vl",
    "transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe",
)

_IMPORT_RE = re.compile(r"from\s+(?:\.\.\.|transformers\.)masking_utils\s+import\s*(\([^)]*\)|[^\n]*)", re.S)


def _models_dir() -> Path | None:
    spec = importlib.util.find_spec("transformers")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "models"


def _imported_builders(source: str) -> set[str]:
    names: set[str] = set()
    for match in _IMPORT_RE.finditer(source):
        for part in match.group(1).strip("()").replace("\n", " ").split(","):
            name = part.strip().split(" as ")[0].strip()
            if name in MASK_BUILDERS:
                names.add(name)
    return names


def find_causal_mask_modules() -> dict[str, tuple[str, ...]]:
    """Module name -> mask builders it imports, for every installed modeling module (source scan, no import)."""
    root = _models_dir()
    found: dict[str, tuple[str, ...]] = {}
    if root is None or not root.is_dir():
        return found
    for path in sorted(root.glob("*/modeling_*.py")):
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:  # an unreadable install is a broken install: say which file
            raise RuntimeError(f"cannot read {path} while discovering mask builders: {exc}") from exc
        names = _imported_builders(source)
        if names:
            found[f"transformers.models.{path.parent.name}.{path.stem}"] = tuple(sorted(names))
    return found


def get_packing_modules() -> list[str]:
    """The seed's modules that exist in the installed transformers, then every other discovered one."""
    discovered = find_causal_mask_modules()
    seed = [name for name in PACKING_PATCH_MODULES if importlib.util.find_spec(name) is not None]
    return seed + [name for name in discovered if name not in seed]
