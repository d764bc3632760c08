"""Test helpers (imported by the test modules; pytest runs with --import-mode=importlib)."""

from __future__ import annotations

from typing import Any


def instance_state(model: Any) -> dict[str, dict[str, Any]]:
    """Every module's own __dict__ (shallow): identity-comparable snapshot of instance patches."""
    return {path: dict(vars(module)) for path, module in model.named_modules()}


def assert_same_state(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]) -> None:
    assert before.keys() == after.keys()
    for path in before:
        assert before[path].keys() == after[path].keys(), (path, before[path].keys() ^ after[path].keys())
        for key, value in before[path].items():
            assert after[path][key] is value, f"{path or '<root>'}.{key} changed"
