"""Contract checks run before patching a private transformers/torch object.

Copied byte-for-byte into every am-* package that patches transformers (see `_patch.py`).
Every failure is a RuntimeError that names the object and the installed transformers
version, so a transformers release that changes a private contract fails loudly when the
patch is applied, never silently afterwards.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterable
from typing import Any


def transformers_version() -> str:
    try:
        import transformers
    except ImportError:  # callers that patch transformers import it first; this is for messages
        return "not installed"
    return str(transformers.__version__)


def qualified_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}" if module else name


def contract_error(what: str, problem: str) -> RuntimeError:
    """A RuntimeError saying that `what` no longer matches what we patch against."""
    return RuntimeError(
        f"{what}: {problem} (installed transformers {transformers_version()}); "
        "this transformers version changed a private contract that automodel-kit patches, "
        "so the patch was not applied"
    )


def require_callable(obj: Any, what: str) -> Callable[..., Any]:
    if not callable(obj):
        raise contract_error(what, f"expected a callable, found {obj!r}")
    return obj


def require_parameters(func: Any, names: Iterable[str], what: str | None = None) -> inspect.Signature:
    """Check that `func` accepts every parameter in `names` (by name, or through **kwargs)."""
    label = what or qualified_name(func)
    require_callable(func, label)
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError) as exc:
        raise contract_error(label, f"its signature cannot be read ({exc})") from exc
    params = sig.parameters
    has_var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    missing = [n for n in names if n not in params and not has_var_kw]
    if missing:
        raise contract_error(label, f"expected parameters {missing} in signature {sig}")
    return sig


def require_attribute(owner: Any, name: str, what: str | None = None) -> Any:
    label = what or f"{qualified_name(owner)}.{name}"
    if not hasattr(owner, name):
        raise contract_error(label, "the attribute no longer exists")
    return getattr(owner, name)


def import_module_checked(name: str) -> Any:
    """Import a transformers module, turning its absence into a contract error."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise contract_error(name, f"the module cannot be imported ({exc})") from exc


def require_result(what: str, result: Any, check: Callable[[Any], bool], expected: str) -> Any:
    """Check a probe call's result; `expected` describes it for the error."""
    if not check(result):
        raise contract_error(what, f"probe returned {result!r}, expected {expected}")
    return result
