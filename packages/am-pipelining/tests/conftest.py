import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def _marked_globals() -> list[str]:
    """Our marker on any class or transformers module attribute = a patch that escaped an instance."""
    import transformers.masking_utils as mu

    found = [f"masking_utils.{n}" for n, v in vars(mu).items() if getattr(v, "__am_patch__", None)]
    for mod_name, mod in list(sys.modules.items()):
        if not mod_name.startswith("transformers.models.") or not mod_name.split(".")[-1].startswith(
            "modeling_"
        ):
            continue
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, type) and getattr(vars(obj).get("forward"), "__am_patch__", None):
                found.append(f"{mod_name}.{name}.forward")
    return found


@pytest.fixture(autouse=True)
def _no_leaked_patches():
    torch.set_num_threads(1)
    yield
    leaked = _marked_globals()
    assert not leaked, f"test leaked patches onto shared objects: {leaked}"
