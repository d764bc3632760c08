"""Contract checks run before patching a private object of another library (transformers by default).

Copied byte-for-byte into every am-* package that patches anything (see `_patch.py`). Every
failure is a RuntimeError that names the object and the installed version of the library that
owns it, so a release that changes a private contract fails loudly when the patch is applied,
never silently afterwards.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import itertools
from collections.abc import Callable, Iterable
from typing import Any

# Import name -> distribution name, for the version in messages.
_DISTRIBUTIONS = {"transformer_engine": "transformer-engine", "liger_kernel": "liger-kernel"}


def library_version(library: str = "transformers") -> str:
    """The installed version of `library` (an import name), or "not installed"; never imports it."""
    try:
        return importlib.metadata.version(_DISTRIBUTIONS.get(library, library))
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def transformers_version() -> str:
    return library_version("transformers")


def _release(version: str) -> tuple[int, ...]:
    """The leading release numbers of a version string: "5.3.0.dev0" -> (5, 3, 0)."""
    numbers = []
    for part in version.split("."):
        digits = "".join(itertools.takewhile(str.isdigit, part))
        if not digits:
            break
        numbers.append(int(digits))
        if digits != part:
            break
    return tuple(numbers)


def require_installed(package: str, minimum: str, library: str = "transformers") -> None:
    """Raise ImportError (at `package`'s import) when `library` is installed older than `minimum`.

    pip's dependency resolution is bypassed by ``--no-deps`` or a pinned environment; the private objects
    we patch do not exist in older releases, so refuse at import rather than fail deep inside a patch.
    A missing library passes: importing it later says so.
    """
    found = library_version(library)
    if found != "not installed" and _release(found) < _release(minimum):
        raise ImportError(
            f"{package} supports {library}>={minimum}, but the installed {library} is {found} (unsupported): "
            f"pip install -U '{library}>={minimum}'"
        )


def qualified_name(obj: Any) -> str:
    module = getattr(obj, "__module__", None) or ""
    name = getattr(obj, "__qualname__", None) or getattr(obj, "__name__", None) or repr(obj)
    return f"{module}.{name}" if module else name


def contract_error(what: str, problem: str, *, library: str = "transformers") -> RuntimeError:
    """A RuntimeError saying that `what` (owned by `library`) no longer matches what we patch against."""
    return RuntimeError(
        f"{what}: {problem} (installed {library} {library_version(library)}); "
        f"this {library} version changed a private contract that automodel-kit patches, "
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


# Private parameters transformers renamed, the oldest spelling first. Adapting to the next rename is
# one row here: every caller asks `parameter_name` which spelling the installed function declares.
RENAMED_PARAMETERS: dict[str, tuple[str, ...]] = {
    "past_key_values": ("past_key_values", "cache"),  # mask builders and modeling forwards, 5.24
}


def parameter_name(func: Any, name: str, what: str | None = None) -> str:
    """The spelling of parameter `name` (a key of RENAMED_PARAMETERS, or any name) that `func` declares.

    Only named parameters count (not ``**kwargs``): a deprecation shim that still accepts the old name
    through ``**kwargs`` is not what the function itself takes. When two spellings are declared, the one that
    can be passed positionally is the parameter and a keyword-only other is its deprecated alias
    (transformers 5.25's ``create_causal_mask(..., cache, ..., *, past_key_values=None)``).
    """
    label = what or qualified_name(func)
    spellings = RENAMED_PARAMETERS.get(name, (name,))
    sig = require_parameters(func, (), label)
    named = [
        s
        for s in spellings
        if s in sig.parameters and sig.parameters[s].kind is not inspect.Parameter.VAR_KEYWORD
    ]
    if len(named) > 1:
        positional = [s for s in named if sig.parameters[s].kind is not inspect.Parameter.KEYWORD_ONLY]
        if len(positional) == 1:
            named = positional
    if len(named) != 1:
        found = "both" if named else "neither"
        raise contract_error(
            label, f"expected exactly one of the parameters {list(spellings)}, found {found} in {sig}"
        )
    return named[0]


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
