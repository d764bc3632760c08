import re
from pathlib import Path


def test_readme_example_runs(capsys, monkeypatch):
    # The compiled path is covered by test_norms.py; compiling again here would double the suite's time.
    monkeypatch.setenv("AM_PRECISION_DISABLE_COMPILE", "1")
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## 60-second example\s+```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "DenseReluDense.wo.weight" in out and "sdpa torch" in out


def test_readme_fp8_example_runs(capsys):
    text = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"## FP8 linears \(Transformer Engine\).*?```python\n(.*?)```", text, re.S).group(1)
    exec(compile(code, "README.md", "exec"), {})
    assert "lm_head" in capsys.readouterr().out
