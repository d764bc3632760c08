"""The protocol modules are duplicated on purpose (no runtime cross-imports); keep the copies identical."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("_patch.py", "_contract.py")
REFERENCE = ROOT / "packages" / "am-kernels" / "src" / "am_kernels"


def _copies(name: str) -> list[Path]:
    return sorted(p for p in (ROOT / "packages").glob(f"*/src/*/{name}") if p.parent != REFERENCE)


@pytest.mark.parametrize("name", SHARED)
def test_every_copy_is_byte_identical(name: str) -> None:
    reference = (REFERENCE / name).read_bytes()
    copies = _copies(name)
    assert len(copies) >= 4, f"expected {name} in the patching packages, found {copies}"
    different = [str(p.relative_to(ROOT)) for p in copies if p.read_bytes() != reference]
    assert not different, f"{name} differs from am-kernels' copy in: {different}"
