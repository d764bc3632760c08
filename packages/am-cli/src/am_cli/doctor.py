"""`am doctor`: build a model from a config and run every package's check on it."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from .main import EXIT_CHECK_FAILED, EXIT_OK
from .render import render_json, render_text
from .report import Report, Section
from .tiny_models import TINY_ARCHS, build_config, load_local_config


class DoctorInputError(ValueError):
    """Bad input: a --model that names no built-in architecture and no readable, buildable config."""


def resolve_model(spec: str) -> tuple[str, Any]:
    """(label, config) for a built-in tiny architecture name, a local model directory or a config file.

    A local config must build (on the meta device, at full size and shrunk for the numeric checks);
    anything transformers rejects in it is a DoctorInputError naming the file, before any check runs.
    """
    if spec in TINY_ARCHS:
        try:
            return f"built-in tiny {spec}", build_config(spec)
        except ValueError as exc:
            raise DoctorInputError(str(exc)) from exc
    if not (("/" in spec) or spec.startswith(".") or Path(spec).exists()):
        raise DoctorInputError(
            f"--model {spec!r} is neither a built-in model ({', '.join(TINY_ARCHS)}) nor an existing "
            "directory or config file"
        )
    try:
        config = load_local_config(spec)
    except ValueError as exc:
        raise DoctorInputError(str(exc)) from exc
    _check_buildable(spec, config)
    return f"local config {spec}", config


def _check_buildable(spec: str, config: Any) -> None:
    from .checks._models import meta_model

    for label, candidate in (("", config), (" (shrunk for the numeric checks)", shrink_config(config))):
        try:
            meta_model(candidate)
        except Exception as exc:  # transformers' reason for refusing the user's config, in one line
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise DoctorInputError(
                f"transformers cannot build {type(config).__name__} from {spec}{label}: "
                f"{type(exc).__name__}: {first}"
            ) from exc


def _text_config(config: Any) -> Any:
    return getattr(config, "text_config", None) or config


def shrink_config(config: Any) -> Any:
    """A copy small enough for a CPU: at most 4 layers, hidden 64, vocab ≤ 512, same attention layout."""
    config = copy.deepcopy(config)
    text = _text_config(config)
    heads = getattr(text, "num_attention_heads", None)
    if not heads:
        return config
    kv = getattr(text, "num_key_value_heads", None) or heads
    new_heads = 4
    new_kv = max(1, new_heads // max(1, heads // kv))
    layers = min(getattr(text, "num_hidden_layers", 4), 4)
    updates = dict(
        num_attention_heads=new_heads,
        num_key_value_heads=new_kv,
        hidden_size=64,
        head_dim=16,
        intermediate_size=128,
        num_hidden_layers=layers,
    )
    if getattr(text, "vocab_size", 0) and text.vocab_size > 512:
        updates["vocab_size"] = 512
    for key, value in updates.items():
        if hasattr(text, key):
            setattr(text, key, value)
    if getattr(text, "layer_types", None):
        text.layer_types = list(text.layer_types)[:layers]
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        value = getattr(text, key, None)
        if isinstance(value, int) and value >= text.vocab_size:
            setattr(text, key, 0)
    return config


def build_report(spec: str, *, stages: int = 2, console: Console | None = None) -> Report:
    """Run every check; `console` (stderr) shows progress for the long steps."""
    from .checks import attention, environment, kernels, packing, pipelining, precision

    label, config = resolve_model(spec)
    numeric_config = config if spec in TINY_ARCHS else shrink_config(config)
    report = Report(model=label, model_type=str(getattr(config, "model_type", "?")))
    steps: list[tuple[str, Callable[[], Section]]] = [
        ("versions and optional kernels", environment.check_environment),
        ("attention backend resolution", lambda: attention.check_selection(config)),
        ("TE attention injection plan", lambda: attention.check_te_plan(config)),
        ("packed vs unpacked logits per backend", lambda: packing.check_packing(numeric_config)),
        ("fp32 parameters after a bf16 cast", lambda: precision.check_fp32_cast(config)),
        ("pipeline-parallel compatibility", lambda: pipelining.check_pipeline(config, stages)),
        ("Liger kernel plan", lambda: kernels.check_liger(numeric_config)),
    ]
    for title, step in steps:
        if console is not None:
            with console.status(f"[bold]{title}[/bold]…"):
                report.sections.append(step())
        else:
            report.sections.append(step())
    return report


def run_doctor(*, model: str, as_json: bool, stages: int = 2, bench: bool = False) -> int:
    """Print the report; EXIT_OK when no check failed (refusals with a reason are not failures)."""
    if stages < 1:
        raise DoctorInputError(f"--stages must be at least 1, got {stages}")
    out = Console(width=None if sys.stdout.isatty() else 130)
    err = Console(stderr=True)
    report = build_report(model, stages=stages, console=err)
    if bench:
        from .bench import bench_section

        with err.status("[bold]packing benchmark[/bold]…"):
            report.sections.append(bench_section())
    if as_json:
        print(render_json(report))
    else:
        render_text(report, out)
    return EXIT_OK if report.ok else EXIT_CHECK_FAILED
