"""What is patched where: found by the `__am_patch__` marker, never by name."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from ._patch import patch_name


@dataclass(frozen=True)
class PatchedModule:
    """One module instance carrying at least one of our replacements in its own `__dict__`."""

    path: str  # dotted path from the model root; "" is the model itself
    class_name: str  # the real class (never changed by our patches)
    shown_as: str  # what `print(model)` shows (`_get_name()`)
    patches: tuple[tuple[str, str], ...]  # (attribute, marker) pairs, sorted by attribute

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(sorted({marker for _, marker in self.patches}))


@dataclass(frozen=True)
class PatchReport:
    """Every patched module of a model, in `named_modules()` order."""

    model_class: str
    modules: tuple[PatchedModule, ...]

    def counts(self) -> dict[str, int]:
        """Number of modules per patch marker, e.g. {"am_kernels.liger.rms_norm": 5}."""
        return dict(sorted(Counter(k for m in self.modules for k in m.kernels).items()))

    def __bool__(self) -> bool:
        return bool(self.modules)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for `am doctor --json`)."""
        return {
            "model_class": self.model_class,
            "counts": self.counts(),
            "modules": [
                {
                    "path": m.path,
                    "class": m.class_name,
                    "shown_as": m.shown_as,
                    "patches": {attr: marker for attr, marker in m.patches},
                }
                for m in self.modules
            ],
        }

    def format(self, *, per_module: bool = True) -> str:
        """Plain-text table: a summary line per marker, then one line per patched module."""
        if not self.modules:
            return f"{self.model_class}: no am-* patches"
        lines = [f"{self.model_class}: {len(self.modules)} patched modules"]
        lines += [f"  {marker}: {count}" for marker, count in self.counts().items()]
        if per_module:
            for m in self.modules:
                attrs = ", ".join(attr for attr, _ in m.patches)
                lines.append(f"  {m.path or '<root>'}: {m.class_name} -> {m.shown_as} [{attrs}]")
        return "\n".join(lines)


def _module_patches(module: Any) -> tuple[tuple[str, str], ...]:
    try:
        own = vars(module)
    except TypeError:  # no __dict__: nothing can be patched on it
        return ()
    found = []
    for attr, value in own.items():
        marker = patch_name(value)
        if isinstance(marker, str):
            found.append((attr, marker))
    return tuple(sorted(found))


def get_patch_report(model: Any) -> PatchReport:
    """Report every module of `model` (a torch `nn.Module`, or any object) that holds an am-* replacement."""
    named = model.named_modules() if isinstance(model, torch.nn.Module) else [("", model)]
    modules = []
    for path, module in named:
        patches = _module_patches(module)
        if patches:
            shown = module._get_name() if isinstance(module, torch.nn.Module) else type(module).__name__
            modules.append(PatchedModule(path, type(module).__name__, shown, patches))
    return PatchReport(type(model).__name__, tuple(modules))


__all__ = ["PatchReport", "PatchedModule", "get_patch_report"]
