"""Discovery reads modeling sources without importing them."""

from __future__ import annotations

import importlib.util
import sys

from am_packing import PACKING_PATCH_MODULES, find_causal_mask_modules, get_packing_modules
from am_packing.discovery import _imported_builders


def test_discovers_known_decoders_without_importing():
    before = set(sys.modules)
    found = find_causal_mask_modules()
    assert not {m for m in set(sys.modules) - before if m.startswith("transformers.models.")}
    for name in ("llama", "qwen2", "qwen3", "mistral", "gemma3"):
        assert f"transformers.models.{name}.modeling_{name}" in found
    assert "create_sliding_window_causal_mask" in found["transformers.models.mistral.modeling_mistral"]
    assert len(found) > 100


def test_packing_modules_start_with_the_seed_list():
    modules = get_packing_modules()
    seed = [m for m in PACKING_PATCH_MODULES if importlib.util.find_spec(m) is not None]
    assert modules[: len(seed)] == seed and "transformers.models.llama.modeling_llama" in seed
    assert len(set(modules)) == len(modules)


def test_import_parser():
    src = (
        "from ...masking_utils import (\n    create_bidirectional_mask,\n    create_causal_mask as ccm,\n)\n"
    )
    assert _imported_builders(src) == {"create_causal_mask"}
    assert _imported_builders("from ...masking_utils import create_sliding_window_causal_mask\n") == {
        "create_sliding_window_causal_mask"
    }
    assert _imported_builders("import torch\n") == set()
