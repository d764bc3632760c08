"""Copy a function, through its decorators, so that one global name resolves to another object.

transformers' attention forwards call the module-level `apply_rotary_pos_emb`. To change that
call for one module instance only, the patcher binds a copy of the class forward whose globals
resolve that one name differently; the modeling module itself is never changed. Since 5.24 the
forwards are decorated (`deprecate_kwarg`), so the function that reads the global is the
innermost of a `__wrapped__` chain. Each `functools.wraps` layer that keeps the next function in
its closure is rebuilt around the copy; any other kind of wrapper cannot be rebuilt and is refused.
"""

from __future__ import annotations

import types
from typing import Any

from ._contract import contract_error

# Far more layers than any transformers forward has; a longer chain is a loop or not a decorator stack.
_MAX_WRAPPERS = 16


_NOTHING = object()


class _OverlayGlobals(dict):
    """Globals for a copied function: own entries win, every other name is read live from the module.

    CPython looks globals of a dict subclass up through `__getitem__`, which reads the module's
    current namespace, so later changes to the module stay visible and only the overridden names
    differ. torch.compile reads globals through both paths: it traces with `__getitem__`, but its
    guards read the dict itself. So the dict also holds a copy of the module's namespace, refreshed
    by every lookup (a guard never sees a value other than the one traced), and names torch.compile
    installs (its compiled functions) are kept here, next to the copied code. Limitation: while
    compiled code runs no lookup happens, so a name rebound in the module afterwards is picked up at
    the next recompile, not before.
    """

    def __init__(self, module_globals: dict[str, Any], overrides: dict[str, Any]) -> None:
        super().__init__(module_globals)
        # Builtins are resolved from this key when the function is created.
        fixed = {"__builtins__": module_globals["__builtins__"], **overrides}
        dict.update(self, fixed)
        self._fixed = frozenset(fixed)
        self._installed: set[str] = set()
        self._module_globals = module_globals

    def __getitem__(self, key: str) -> Any:
        if key in self._fixed:
            return dict.__getitem__(self, key)
        try:
            value = self._module_globals[key]
        except KeyError:
            if key in self._installed:
                return dict.__getitem__(self, key)
            dict.pop(self, key, None)  # gone from the module: gone here too
            raise
        if dict.get(self, key, _NOTHING) is not value:
            dict.__setitem__(self, key, value)
        return value

    def __setitem__(self, key: str, value: Any) -> None:
        self._installed.add(key)
        dict.__setitem__(self, key, value)

    # Membership and .get() agree with lookup.
    def __contains__(self, key: object) -> bool:
        return key in self._fixed or key in self._installed or key in self._module_globals

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default


def _holds(cell: types.CellType, value: Any) -> bool:
    try:
        return cell.cell_contents is value
    except ValueError:  # an empty cell (a closure variable not assigned yet)
        return False


def wrapper_chain(func: Any, what: str) -> list[types.FunctionType]:
    """`func` and every function below it on its `__wrapped__` chain, outermost first.

    Raises a contract error unless each one is a Python function and each wrapper holds the
    next function in its closure, the only form `with_global` can rebuild around a copy.
    """
    chain: list[types.FunctionType] = []
    while True:
        if not isinstance(func, types.FunctionType):
            raise contract_error(
                what, f"expected a Python function so its globals can be rebound, found {func!r}"
            )
        chain.append(func)
        inner = vars(func).get("__wrapped__")
        if inner is None:
            return chain
        if len(chain) > _MAX_WRAPPERS:
            raise contract_error(what, f"its __wrapped__ chain is longer than {_MAX_WRAPPERS} decorators")
        if not any(_holds(cell, inner) for cell in func.__closure__ or ()):
            raise contract_error(
                what,
                f"the decorator {func.__module__}.{func.__qualname__} does not keep the function it wraps in its "
                "closure, so it cannot be rebuilt around a copy with rebound globals",
            )
        func = inner


def _copy(
    func: types.FunctionType,
    namespace: dict[str, Any],
    closure: tuple[Any, ...] | None,
    code: types.CodeType | None = None,
) -> types.FunctionType:
    copy = types.FunctionType(code or func.__code__, namespace, func.__name__, func.__defaults__, closure)
    copy.__kwdefaults__ = func.__kwdefaults__
    copy.__qualname__ = func.__qualname__
    copy.__module__ = func.__module__
    copy.__doc__ = func.__doc__
    copy.__annotations__ = dict(func.__annotations__)
    # functools.wraps keeps `__wrapped__` (and the wrapped function's attributes) in `__dict__`.
    copy.__dict__.update(func.__dict__)
    return copy


def _rewrap(
    wrapper: types.FunctionType, inner: types.FunctionType, copy: types.FunctionType
) -> types.FunctionType:
    """`wrapper` rebuilt to call `copy` where it called `inner`; its other closure cells are shared as they are."""
    closure = tuple(
        types.CellType(copy) if _holds(cell, inner) else cell for cell in wrapper.__closure__ or ()
    )
    rebuilt = _copy(wrapper, wrapper.__globals__, closure)
    rebuilt.__wrapped__ = copy  # type: ignore[attr-defined]
    return rebuilt


def with_global(func: Any, name: str, value: Any, what: str) -> types.FunctionType:
    """A copy of `func` whose innermost function sees `value` for the global `name`.

    Decorators stay in place: each layer of the `__wrapped__` chain is rebuilt around the copy
    below it. Neither `func` nor any module is changed. `what` names `func` in contract errors.

    The innermost copy gets its own code object (same bytecode, `code.replace()`): torch.compile
    caches compiled frames per code object, and a frame compiled with these globals must never be
    reused for the original function (or another copy), whose globals lack what it installed here.
    Bind one copy to every module that should share the overridden value, so that they also share
    the compiled frames.
    """
    chain = wrapper_chain(func, what)
    innermost = chain[-1]
    namespace = _OverlayGlobals(innermost.__globals__, {name: value})
    copy = _copy(innermost, namespace, innermost.__closure__, innermost.__code__.replace())
    for wrapper, inner in zip(reversed(chain[:-1]), reversed(chain[1:])):
        copy = _rewrap(wrapper, inner, copy)
    return copy


__all__ = ["with_global", "wrapper_chain"]
