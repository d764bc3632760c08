"""Render a doctor Report as rich tables or JSON."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.table import Table

from .report import FAIL, PASS, REFUSED, SKIP, Report

_STYLE = {
    PASS: "[green]pass[/green]",
    FAIL: "[bold red]FAIL[/bold red]",
    SKIP: "[yellow]skip[/yellow]",
    REFUSED: "[yellow]refused[/yellow]",
}


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) if value else "—"
    if value is None:
        return "—"
    return str(value)


def render_text(report: Report, console: Console) -> None:
    console.rule(f"[bold]am doctor[/bold] — {report.model} ({report.model_type})")
    for section in report.sections:
        table = Table(title=f"{section.title}", title_justify="left", show_lines=False, expand=False)
        for column in section.columns:
            table.add_column(column)
        table.add_column("check")
        for row in section.rows:
            table.add_row(*(_cell(row.get(c)) for c in section.columns), _STYLE.get(row["status"], ""))
        console.print(table)
        for note in section.notes:
            console.print(f"  [dim]{note}[/dim]")
    refusals = report.refusals()
    if refusals:
        console.print("[bold yellow]Refused, with the reason (not a failure):[/bold yellow]")
        for refusal in refusals:
            console.print(f"  - {refusal}")
    if report.ok:
        console.print("[bold green]All checks passed.[/bold green]")
    else:
        console.print("[bold red]Failed checks:[/bold red]")
        for failure in report.failures():
            console.print(f"  - {failure}")


def render_json(report: Report) -> str:
    return json.dumps(report.to_dict(), indent=2, default=str)
