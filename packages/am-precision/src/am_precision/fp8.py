"""FP8 recipes by name and the training-loop context that runs TE modules in FP8 (`te_fp8_autocast`).

Recipe names: `"current"` (Float8CurrentScaling, per-tensor scale from each tensor's amax), `"delayed"`
(DelayedScaling, scale from an amax history), `"block"` (Float8BlockScaling, 1x128/128x128 blocks, Hopper with
CUDA >= 12.9) and `"mxfp8"` (MXFP8BlockScaling, e8m0 scales per 32 values, Blackwell only). A `TEFp8Config`
or an already built TE recipe object is accepted too. `te_fp8_autocast` enters TE's `autocast(enabled=...,
recipe=...)` (TE >= 2.8) or the older `fp8_autocast(enabled=..., fp8_recipe=...)`, whichever the installed TE
has, after asking TE whether this GPU runs the recipe (its `is_*_available`), so an unsupported recipe is a
RuntimeError naming it and TE's reason before any forward.
"""

from __future__ import annotations

import importlib
import inspect
from contextlib import AbstractContextManager
from typing import Any

from . import availability
from ._args import check_bool
from .config import TEFp8Config
from .te_lazy import load_te

__all__ = ["FP8_RECIPES", "build_fp8_recipe", "te_fp8_autocast"]

#: Recipe name -> class in transformer_engine.common.recipe.
FP8_RECIPES: dict[str, str] = {
    "current": "Float8CurrentScaling",
    "delayed": "DelayedScaling",
    "block": "Float8BlockScaling",
    "mxfp8": "MXFP8BlockScaling",
}

# Recipe class -> TE's availability check for it (the rest use is_fp8_available).
_AVAILABILITY = {
    "Float8BlockScaling": "is_fp8_block_scaling_available",
    "MXFP8BlockScaling": "is_mxfp8_available",
}


def check_recipe(recipe: object, argument: str = "recipe") -> object:
    """A recipe name from FP8_RECIPES, a TEFp8Config or a TE recipe object; ValueError otherwise (TE not needed)."""
    if isinstance(recipe, TEFp8Config):
        return recipe.recipe
    if isinstance(recipe, str):
        if recipe not in FP8_RECIPES:
            raise ValueError(
                f"{argument}={recipe!r} is not an FP8 recipe; expected one of {list(FP8_RECIPES)}, "
                "a TEFp8Config or a transformer_engine.common.recipe object"
            )
        return recipe
    try:
        TEFp8Config(recipe=recipe)  # rejects None, numbers, containers, tensors, dtypes
    except ValueError:
        raise ValueError(
            f"{argument} must be one of {list(FP8_RECIPES)}, a TEFp8Config or a TE recipe object, "
            f"got {type(recipe).__name__} {recipe!r:.80}"
        ) from None
    return recipe


def build_fp8_recipe(recipe: object = "current") -> Any:
    """The TE recipe object for `recipe` (see module doc); ImportError with the install line without TE."""
    recipe = check_recipe(recipe)
    if not availability.HAVE_TE:
        raise ImportError(
            f"FP8 recipes need transformer-engine, which is not installed: {availability.TE_INSTALL_HINT}"
        )
    if not isinstance(recipe, str):
        return recipe
    recipes = importlib.import_module("transformer_engine.common.recipe")
    cls = getattr(recipes, FP8_RECIPES[recipe], None)
    if cls is None:
        raise ImportError(
            f"recipe={recipe!r} needs transformer_engine.common.recipe.{FP8_RECIPES[recipe]}, which the installed "
            "transformer-engine does not have"
        )
    return cls()


def _check_supported(te: Any, recipe: Any) -> None:
    name = type(recipe).__name__
    check = getattr(te, _AVAILABILITY.get(name, "is_fp8_available"), None)
    if check is None:  # older TE: its autocast checks on entry
        return
    if "return_reason" in inspect.signature(check).parameters:
        result = check(return_reason=True)
    else:
        result = check()
    ok, reason = result if isinstance(result, tuple) else (bool(result), "")
    if not ok:
        raise RuntimeError(f"FP8 recipe {name} cannot run on this device: {reason or 'not supported'}")


def te_fp8_autocast(recipe: object = "current", *, enabled: bool = True) -> AbstractContextManager[Any]:
    """TE's FP8 autocast with `recipe`: wrap the forward (TE runs the backward with the same recipe).

    ImportError without transformer-engine, ValueError for an unknown recipe, RuntimeError when the GPU cannot
    run it. `enabled=False` enters TE's autocast disabled (TE modules run in their parameters' dtype).
    """
    check_bool(enabled, "enabled")
    built = build_fp8_recipe(recipe)
    te = load_te()
    if enabled:
        _check_supported(te, built)
    autocast = getattr(te, "autocast", None)
    if autocast is not None:
        return autocast(enabled=enabled, recipe=built)
    return te.fp8_autocast(enabled=enabled, fp8_recipe=built)
