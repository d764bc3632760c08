"""Importing any package with transformers 4.x installed (pip --no-deps, a pinned environment) must say that
the installed version is unsupported, before anything can be patched.

The old release is simulated by a dist-info directory placed first on the path, which is what
`importlib.metadata` reads: the real transformers 5.x stays importable, so a package that skipped the
check would import fine and the test would fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["am_attention", "am_kernels", "am_packing", "am_pipelining", "am_precision"]


def _fake_transformers(root: Path, version: str) -> Path:
    info = root / f"transformers-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: transformers\nVersion: {version}\n")
    return root


def _import(package: str, path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(path), *sys.path])}
    return subprocess.run(
        [sys.executable, "-c", f"import {package}"], env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_import_refuses_transformers_4(tmp_path, package):
    result = _import(package, _fake_transformers(tmp_path, "4.57.1"))
    assert result.returncode != 0
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("ImportError:"), result.stderr
    assert "4.57.1" in message and "unsupported" in message and ">=5.3" in message, message


@pytest.mark.parametrize("version", ["5.3.0", "5.24.0", "5.30.0.dev0"])
def test_import_accepts_supported_versions(tmp_path, version):
    result = _import("am_packing", _fake_transformers(tmp_path, version))
    assert result.returncode == 0, result.stderr
