"""`am doctor` end to end: the report, its JSON, exit codes and input errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from am_cli.doctor import build_report, resolve_model, shrink_config
from am_cli.main import EXIT_USAGE, main
from am_cli.report import FAIL, PASS, SKIP
from am_cli.tiny_models import available_archs, build_config


def test_default_doctor_passes_every_check(capsys):
    assert main(["doctor", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is True
    sections = report["sections"]
    assert set(sections) == {
        "environment",
        "attention_selection",
        "te_attention",
        "packing",
        "precision",
        "pipelining",
        "liger",
    }
    # Packed vs unpacked: every backend that runs on CPU was measured, and exactly.
    packing = {row["backend"]: row for row in sections["packing"]["rows"]}
    for backend in ("eager", "sdpa", "flex_attention", "te"):
        assert packing[backend]["status"] == PASS
        assert packing[backend]["max |Δ logits|"] <= 1e-4
    # TE plan: all four Llama attention layers are taken.
    assert [r["taken"] for r in sections["te_attention"]["rows"]] == ["yes"] * 4
    # 2-stage split: layers 0-1 then 2-3, lm_head on the last stage.
    stages = sections["pipelining"]["rows"]
    assert [r["stage"] for r in stages] == ["0", "1"]
    assert "lm_head" in stages[1]["owns"] and "embed_tokens" in stages[0]["owns"]


def test_text_report_renders_tables(capsys):
    assert main(["doctor", "--model", "qwen3"]) == 0
    out = capsys.readouterr().out
    for title in ("Installed versions", "Packed vs unpacked", "Transformer Engine", "Pipeline-parallel"):
        assert title in out
    assert "All checks passed." in out


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_pack_exactly(arch):
    """Sliding windows smaller than the documents: every backend, TE's THD path included, stays exact."""
    report = build_report(arch)
    section = next(s for s in report.sections if s.key == "packing")
    measured = [r for r in section.rows if r["status"] != SKIP]
    assert {r["backend"] for r in measured} >= {"eager", "sdpa", "te"}
    assert all(r["status"] == PASS for r in measured), section.rows


def test_vlm_without_flex_support_is_skipped_with_the_reason():
    report = build_report("qwen2-vl")
    packing = {r["backend"]: r for r in next(s for s in report.sections if s.key == "packing").rows}
    assert packing["flex_attention"]["status"] == SKIP
    assert "flex" in packing["flex_attention"]["detail"].lower()


def test_every_builtin_config_resolves():
    for arch in available_archs():
        label, config = resolve_model(arch)
        assert arch in label and config.model_type


def test_missing_path_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "am_cli.main", "doctor", "--model", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == EXIT_USAGE
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bad_config_is_one_line_exit_2(tmp_path):
    (tmp_path / "config.json").write_text("{ this is not json")
    proc = subprocess.run(
        [sys.executable, "-m", "am_cli.main", "doctor", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == EXIT_USAGE
    assert "Traceback" not in proc.stderr and proc.stderr.strip().count("\n") == 0
    assert "cannot read the config" in proc.stderr


def test_unknown_model_type_is_exit_2(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no-such-arch"}))
    assert main(["doctor", "--model", str(tmp_path)]) == EXIT_USAGE


def test_local_directory_runs_on_the_shrunk_config(tmp_path, capsys):
    config = build_config("llama")
    config.num_hidden_layers = 6
    config.save_pretrained(tmp_path)
    assert main(["doctor", "--model", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["model"] == f"local config {tmp_path}"
    # Structure is checked at full size (6 layers), numbers on a shrunk copy.
    assert len(report["sections"]["te_attention"]["rows"]) == 6


def test_shrink_keeps_the_gqa_ratio_and_layer_types():
    config = build_config("gemma3")
    config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers = 32, 8, 12
    config.layer_types = ["sliding_attention", "full_attention"] * 6
    small = shrink_config(config)
    assert (small.num_attention_heads, small.num_key_value_heads) == (4, 1)
    assert small.num_hidden_layers == 4 and len(small.layer_types) == 4
    assert config.num_hidden_layers == 12  # the original is untouched


def test_failing_check_gives_exit_1(monkeypatch, capsys):
    import am_cli.checks.packing as packing

    monkeypatch.setattr(packing, "FP32_TOLERANCE", -1.0)  # nothing can meet a negative tolerance
    assert main(["doctor", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert report["sections"]["packing"]["status"] == FAIL
