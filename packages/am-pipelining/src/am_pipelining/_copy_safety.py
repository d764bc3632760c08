"""Instance patches that a deep copy would leave pointing at the model it was copied from.

`split_model_into_stages` deep-copies the model once per stage. deepcopy rebinds a bound method's
`__self__` (and a bound object's, such as our `BoundPipelineForward`, which keeps `__self__`/`__func__`
as plain attributes) and a partial's arguments, but copies functions by reference: whatever their
closure cells hold stays the original object. A patched forward that closes over a module would
therefore run the original model's weights from the stage; a method bound to a module the stage drops
would be rebound to None. These walkers find both, before the copy (our marked patches) and after it.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from ._patch import patch_name

BINDING_FIX = (
    "apply per-instance patches (e.g. Liger) after splitting, or use patches that bind with "
    "types.MethodType (copy.deepcopy rebinds those to the copied module)"
)
# Deep enough for a wrapper closing over a bound method closing over a module; cycles are cut by `seen`.
_MAX_REFERENCE_DEPTH = 6


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def is_bound(value: Any) -> bool:
    """A bound method, or an object bound like one (`__self__` and `__func__` kept in its own __dict__)."""
    if isinstance(value, types.MethodType):
        return True
    own = getattr(value, "__dict__", None)
    return isinstance(own, dict) and "__self__" in own and "__func__" in own


def _modules_reached(value: Any, seen: set[int], depth: int = 0) -> Iterator[nn.Module]:
    """Every module `value` reaches through closure cells, bound `__self__`, partial arguments, containers."""
    if depth > _MAX_REFERENCE_DEPTH or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, nn.Module):
        yield value
        return
    children: list[Any] = []
    if is_bound(value):
        children = [value.__self__, value.__func__]
    elif isinstance(value, functools.partial):
        children = [value.func, *value.args, *value.keywords.values()]
    elif isinstance(value, types.FunctionType):
        for cell in value.__closure__ or ():
            try:
                children.append(cell.cell_contents)
            except ValueError:  # an empty cell (a variable not yet assigned) holds nothing
                continue
    elif isinstance(value, (tuple, list, set, frozenset)):
        children = list(value)
    elif isinstance(value, dict):
        children = list(value.values())
    for child in children:
        yield from _modules_reached(child, seen, depth + 1)


def _modules_kept_by_closures(value: Any) -> Iterator[nn.Module]:
    """Modules a callable reaches that `copy.deepcopy` will NOT rebind to the copy (its closure cells)."""
    if is_bound(value):
        value = value.__func__
    elif isinstance(value, functools.partial):
        value = value.func
    if not isinstance(value, types.FunctionType):
        return
    seen = {id(value)}
    for cell in value.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell holds nothing
            continue
        yield from _modules_reached(content, seen, 1)


def _copied_methods(value: Any, path: str, seen: set[int], depth: int = 0) -> Iterator[tuple[str, Any]]:
    """(path, bound method) for every bound method that deep-copying `value` would rebind.

    Follows what deepcopy copies (containers, partial arguments, plain objects' attributes) and
    stops at modules and tensors (the module tree is walked separately) and at functions (copied
    by reference, closures included).
    """
    if depth > _MAX_REFERENCE_DEPTH or id(value) in seen:
        return
    seen.add(id(value))
    if is_bound(value):
        yield path, value
        return
    if isinstance(value, (nn.Module, torch.Tensor, types.FunctionType, type, str, bytes, int, float)):
        return
    if isinstance(value, functools.partial):
        items = [(f"{path}.args[{i}]", a) for i, a in enumerate(value.args)]
        items += [(f"{path}.keywords[{k!r}]", v) for k, v in value.keywords.items()]
    elif isinstance(value, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in value.items()]
    elif isinstance(value, (tuple, list, set, frozenset)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(value)]
    else:
        try:
            attrs = vars(value)
        except TypeError:  # no __dict__ (slots or a builtin): nothing of ours can hide in it
            return
        items = [(f"{path}.{k}", v) for k, v in attrs.items()]
    for item_path, item in items:
        yield from _copied_methods(item, item_path, seen, depth + 1)


def _callables(module: nn.Module) -> Iterator[tuple[str, Any]]:
    for attr, value in vars(module).items():
        if isinstance(value, (types.FunctionType, functools.partial)) or is_bound(value):
            yield attr, value


def _describe_patch(path: str, attr: str, value: Any) -> str:
    marker = patch_name(value)
    where = _join(path, attr)
    return f"{where} (patch {marker!r})" if marker else where


def check_patches_before_copy(model: nn.Module, skipped: set[int], stage: int) -> None:
    """Refuse our instance patches that deepcopy would leave pointing at `model`'s modules.

    Our replacements carry `__am_patch__`. A closure over a module is never rebound by deepcopy;
    a method bound to a module the stage drops (ids in `skipped`) would be rebound to None.
    """
    names = {id(m): name for name, m in model.named_modules()}
    seen: set[int] = set()
    for path, module in model.named_modules():
        if id(module) in skipped:
            continue
        for attr, value in vars(module).items():
            if attr in ("_modules", "_parameters", "_buffers"):
                continue
            # deepcopy would rebind these to a dropped module, i.e. to None (a TypeError deep in copy):
            # e.g. a patch handle kept on the model that references other stages' patched modules.
            for where, method in _copied_methods(value, _join(path, attr), seen):
                if id(method.__self__) in skipped:
                    marker = patch_name(method)
                    raise ValueError(
                        f"{where}{f' (patch {marker!r})' if marker else ''} is a method bound to "
                        f"{names.get(id(method.__self__), '?')}, which stage {stage} does not own, so the "
                        f"stage cannot be copied without it; apply per-instance patches (e.g. Liger) after "
                        f"splitting (a patch handle kept on the model references every patched module)"
                    )
            if patch_name(value) is None:
                continue
            for target in _modules_kept_by_closures(value):
                if id(target) in names:
                    raise ValueError(
                        f"{_describe_patch(path, attr, value)} closes over {names[id(target)] or '<model>'} "
                        f"({type(target).__name__}) of the model being split: a deep copy keeps that "
                        f"closure, so stage {stage} would run the original model's weights; {BINDING_FIX}"
                    )


def check_bindings(model: nn.Module, original: dict[int, str] | None, what: str) -> None:
    """Every bound method in a module's `__dict__` is bound to that module; nothing reaches `original`.

    `original` maps ids of the modules of the model `model` was copied from to their names; with
    `original=None` (cut_stage on a caller's copy), references must stay inside `model`.
    """
    own = {id(m) for m in model.modules()}
    for path, module in model.named_modules():
        for attr, value in _callables(module):
            owner = value.__self__ if is_bound(value) else None
            if isinstance(owner, nn.Module) and owner is not module:
                place = (
                    f"the ORIGINAL model's {original[id(owner)] or '<model>'}"
                    if original is not None and id(owner) in original
                    else f"another module ({type(owner).__name__})"
                )
                raise ValueError(
                    f"{_describe_patch(path, attr, value)} of {what} is bound to {place}, not to "
                    f"{path or '<model>'} itself; {BINDING_FIX}"
                )
            for target in _modules_reached(value, set()):
                if original is not None and id(target) in original:
                    raise ValueError(
                        f"{_describe_patch(path, attr, value)} of {what} still reaches the ORIGINAL "
                        f"model's {original[id(target)] or '<model>'} ({type(target).__name__}) after the "
                        f"deep copy, so it would run the original weights; {BINDING_FIX}"
                    )
                if original is None and id(target) not in own:
                    raise ValueError(
                        f"{_describe_patch(path, attr, value)} of {what} reaches a "
                        f"{type(target).__name__} outside it (e.g. in the model it was copied from), so it "
                        f"would run that module's weights; {BINDING_FIX}"
                    )
