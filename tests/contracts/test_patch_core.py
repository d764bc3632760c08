"""The shared protocol core (`_patch.py`), tested once against every package's copy.

Each copy is loaded from its file as a standalone module, so a copy that drifted from am-kernels'
reference fails here with its own path in the test id (test_shared_copies.py checks the bytes).
"""

from __future__ import annotations

import importlib.util
import threading
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COPIES = sorted(ROOT.glob("packages/*/src/*/_patch.py"))


def _load(path: Path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(f"_patch_copy_{path.parent.name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(params=COPIES, ids=lambda p: p.parent.name)
def core(request: pytest.FixtureRequest) -> types.ModuleType:
    return _load(request.param)


class Target:
    cls_attr = "class"

    def __init__(self) -> None:
        self.a = "a0"
        self.b = "b0"


def test_every_package_has_a_copy() -> None:
    assert len(COPIES) >= 5, COPIES


def test_failed_contract_changes_nothing(core: types.ModuleType) -> None:
    """Phase 1 runs every contract before the first set: a late failing contract leaves the first attribute."""
    target = Target()
    seen: list[str] = []

    def ok(live: object) -> None:
        seen.append(f"ok:{live}")

    def broken(live: object) -> None:
        assert target.a == "a0", "a contract ran after a set"
        raise RuntimeError("drift")

    patches = core.PatchSet(
        [core.Patch(target, "a", "A", contract=ok), core.Patch(target, "b", "B", contract=broken)]
    )
    with pytest.raises(RuntimeError, match="drift"):
        patches.apply()
    assert (target.a, target.b) == ("a0", "b0") and seen == ["ok:a0"]
    assert not any(p.applied for p in patches)


def test_failure_while_setting_rolls_back(core: types.ModuleType) -> None:
    target = Target()

    class Frozen:
        def __setattr__(self, name: str, value: object) -> None:
            raise AttributeError("read-only")

    patches = core.PatchSet([core.Patch(target, "a", "A"), core.Patch(Frozen(), "x", 1)])
    with pytest.raises(AttributeError):
        patches.apply()
    assert target.a == "a0" and "a" in vars(target)


def test_apply_is_idempotent_and_revert_restores_identity(core: types.ModuleType) -> None:
    target = Target()
    original = target.a
    patch = core.Patch(target, "a", object())
    patches = core.PatchSet([patch, core.Patch(target, "cls_attr", "instance")])
    patches.apply()
    patches.apply()
    assert target.a is patch.replacement and vars(target)["cls_attr"] == "instance"
    patches.revert()
    assert target.a is original
    assert "cls_attr" not in vars(target) and target.cls_attr == "class"  # deleted, not copied from the class


def test_revert_refuses_a_foreign_patch_on_top_and_changes_nothing(core: types.ModuleType) -> None:
    target = Target()
    patches = core.PatchSet([core.Patch(target, "a", "A"), core.Patch(target, "b", "B")])
    patches.apply()
    target.b = "foreign"
    with pytest.raises(RuntimeError, match="something else was patched over it"):
        patches.revert()
    assert (target.a, target.b) == ("A", "foreign")


def test_adopted_patch_reverts_as_noop(core: types.ModuleType) -> None:
    target = Target()
    first = core.PatchSet([core.Patch(target, "a", "A")]).apply()
    second = core.PatchSet([core.Patch(target, "a", "A")]).apply()
    second.revert()
    assert target.a == "A"
    first.revert()
    assert target.a == "a0"


def test_item_patch_adds_and_removes_a_key(core: types.ModuleType) -> None:
    registry = {"kept": 1}
    patches = core.PatchSet([core.ItemPatch(registry, "new", 2, label="registry")])
    with patches:
        assert registry == {"kept": 1, "new": 2}
    assert registry == {"kept": 1}


def test_global_patch_owns_one_handle(core: types.ModuleType) -> None:
    target = Target()
    builds: list[int] = []

    def build() -> object:
        builds.append(1)
        return core.PatchSet([core.Patch(target, "a", "A")], name="test")

    guard = core.GlobalPatch(build)
    assert guard.active is None
    handle = guard.apply()
    assert guard.apply() is handle and len(builds) == 1 and guard.active is handle
    handle.revert()  # the handle's own undo clears the guard too
    assert guard.active is None and target.a == "a0"
    with guard.apply():
        assert target.a == "A"
    assert guard.active is None and len(builds) == 2
    guard.revert()  # no-op when nothing is live
    guard.apply()
    guard.revert()
    assert target.a == "a0" and guard.active is None


def test_global_patch_failed_build_leaves_nothing(core: types.ModuleType) -> None:
    def build() -> object:
        raise ValueError("bad argument")

    guard = core.GlobalPatch(build)
    with pytest.raises(ValueError, match="bad argument"):
        guard.apply()
    assert guard.active is None


def test_global_patch_is_applied_once_across_threads(core: types.ModuleType) -> None:
    target = Target()
    builds: list[int] = []
    barrier = threading.Barrier(4)

    def build() -> object:
        builds.append(1)
        return core.PatchSet([core.Patch(target, "a", "A")])

    guard = core.GlobalPatch(build)
    handles: list[object] = []

    def worker() -> None:
        barrier.wait()
        handles.append(guard.apply())

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(builds) == 1 and all(h is handles[0] for h in handles)
    guard.revert()
    assert target.a == "a0"


def test_mark_and_patch_name(core: types.ModuleType) -> None:
    def original() -> str:
        """doc"""
        return "o"

    replacement = core.mark(lambda: "r", "am_test.replacement", wrapped=original)
    assert core.patch_name(replacement) == "am_test.replacement"
    assert (
        replacement.__doc__ == "doc" and core.patch_name(original) is None and core.patch_name(None) is None
    )
