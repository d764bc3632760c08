"""`am doctor` end to end: the report, its JSON, exit codes and input errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from am_cli.doctor import build_report, resolve_model, shrink_config
from am_cli.main import EXIT_OK, EXIT_USAGE, main
from am_cli.report import FAIL, PASS, REFUSED, SKIP, Report, Section
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


def test_a_named_config_file_is_the_one_checked(tmp_path):
    """`--model dir/qwen.json` reads qwen.json, not the directory's config.json."""
    build_config("llama").save_pretrained(tmp_path)  # dir/config.json: a Llama
    (tmp_path / "qwen.json").write_text(build_config("qwen3").to_json_string())
    label, config = resolve_model(str(tmp_path / "qwen.json"))
    assert config.model_type == "qwen3" and label.endswith("qwen.json")


@pytest.mark.parametrize(
    ("change", "said"),
    [
        ({"hidden_size": "abc"}, "hidden_size must be a positive integer, got 'abc'"),
        ({"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
        ({"num_hidden_layers": True}, "num_hidden_layers must be a positive integer"),
        ({"model_type": "t5"}, "'t5' (T5Config) has no causal LM class"),
    ],
    ids=["str-hidden", "zero-heads", "bool-layers", "t5"],
)
def test_bad_config_values_are_one_line_exit_2_and_valid_json(tmp_path, capsys, change, said):
    values = {**build_config("llama").to_dict(), **change}
    if change.get("model_type") == "t5":
        values = {"model_type": "t5"}
    (tmp_path / "config.json").write_text(json.dumps(values))
    assert main(["doctor", "--model", str(tmp_path), "--json"]) == EXIT_USAGE
    captured = capsys.readouterr()
    assert captured.err.strip().count("\n") == 0 and said in captured.err, captured.err
    report = json.loads(captured.out)
    assert report == {"ok": False, "error": report["error"], "exit_code": EXIT_USAGE}
    assert said in report["error"]


def test_missing_path_with_json_prints_a_json_error(tmp_path, capsys):
    assert main(["doctor", "--model", str(tmp_path / "nope"), "--json"]) == EXIT_USAGE
    assert "does not exist" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.skipif("gemma4" not in available_archs(), reason="the installed transformers has no Gemma4")
def test_gemma4_pipelining_is_refused_with_the_reason_not_failed():
    """Built-in Gemma4 has per-layer inputs, which am-pipelining refuses by name: a refusal, exit 0."""
    from am_cli.checks.pipelining import check_pipeline

    section = check_pipeline(build_config("gemma4"), 2)
    assert section.status == REFUSED and {r["status"] for r in section.rows} == {REFUSED}
    assert any("hidden_size_per_layer_input" in r["owns"] for r in section.rows)
    report = Report(model="gemma4", model_type="gemma4_text", sections=[section])
    assert report.ok and report.refusals() and not report.failures()


def test_refusals_do_not_fail_but_failures_do():
    refused = Section("s", "t", ["a"])
    refused.add(REFUSED, a="no")
    failed = Section("f", "t", ["a"])
    failed.add(FAIL, a="wrong")
    assert Report("m", "x", [refused]).ok and not Report("m", "x", [refused, failed]).ok
    assert failed.status == FAIL and refused.status == REFUSED


def test_exit_codes_have_one_definition():
    import am_cli.doctor as doctor
    import am_cli.main as cli

    assert (doctor.EXIT_OK, doctor.EXIT_CHECK_FAILED) == (cli.EXIT_OK, cli.EXIT_CHECK_FAILED) == (EXIT_OK, 1)
    assert "EXIT_OK =" not in Path(doctor.__file__).read_text()
