"""Runs the README's 60-second example."""

from __future__ import annotations

import re
from pathlib import Path

import torch


def test_readme_example(capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## 60-second example\s+```python\n(.*?)```", readme, re.S).group(1)
    torch.manual_seed(0)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "tensor([[1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 0]])" in out
    assert "packing efficiency 0.94" in out
