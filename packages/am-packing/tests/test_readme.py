"""Runs the README's examples: the 60-second example, "with Trainer", "with TRL" and "A whole dataset"."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = (Path(__file__).parents[1] / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"#+ {re.escape(title)}\n.*?```python\n(.*?)```", README, re.S)
    assert match, f"README has no python block under {title!r}"
    return match.group(1)


def _run(title: str) -> None:
    exec(compile(_section(title), f"README.md ({title})", "exec"), {})


def test_readme_example(capsys):
    torch.manual_seed(0)
    _run("60-second example")
    out = capsys.readouterr().out
    assert "DocumentIdMask(tensor([[1, 1, 1, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 0]]))" in out
    assert "refused: attention_mask is a DocumentIdMask" in out
    assert "packing efficiency 0.94" in out


def test_readme_with_trainer(capsys):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    torch.manual_seed(0)
    _run("with Trainer")
    # 2 steps of 4 examples = the whole dataset once: 5+9+3+12+7+4+8+6 real tokens, whatever the order
    assert "tokens seen: 54" in capsys.readouterr().out


def test_readme_with_trl():
    pytest.importorskip("trl", reason="trl is not installed (add it to the test extra)")
    pytest.importorskip("datasets")
    torch.manual_seed(0)
    _run("with TRL")


def test_readme_a_whole_dataset(capsys):
    pytest.importorskip("datasets", reason="the example packs an HF datasets.Dataset")
    torch.manual_seed(0)
    _run("A whole dataset")
    out = capsys.readouterr().out
    # 91 tokens in 6 rows of 16 (BFD; the volume bound is 6)
    assert "12 documents -> 6 rows, efficiency 0.95" in out
    assert out.count("rows per step: 2") == 3
