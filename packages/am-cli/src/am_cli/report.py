"""The doctor's report model: sections of rows, each check passing, failing, refused or informational.

A refusal is a package declining a model with a reason (the "exact or refused" rule): the right answer,
not a failure, so it does not fail the report; a failure is a wrong result or a broken check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

PASS = "pass"
FAIL = "fail"
INFO = "info"
SKIP = "skip"
REFUSED = "refused"
STATUSES = (PASS, FAIL, INFO, SKIP, REFUSED)


@dataclass
class Section:
    """One table of the report. `status` is FAIL when any row failed."""

    key: str
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, status: str = INFO, **values: Any) -> None:
        if status not in STATUSES:
            raise ValueError(f"row status {status!r} is not one of {'/'.join(STATUSES)}")
        self.rows.append({**values, "status": status})

    @property
    def status(self) -> str:
        statuses = {r["status"] for r in self.rows}
        for status in (FAIL, PASS, REFUSED):
            if status in statuses:
                return status
        return INFO

    def to_dict(self) -> dict[str, Any]:
        return {"title": self.title, "status": self.status, "rows": self.rows, "notes": self.notes}


@dataclass
class Report:
    model: str
    model_type: str
    sections: list[Section] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.status != FAIL for s in self.sections)

    def _rows(self, status: str) -> list[str]:
        return [
            f"{s.title}: {', '.join(str(v) for k, v in r.items() if k != 'status')}"
            for s in self.sections
            for r in s.rows
            if r["status"] == status
        ]

    def failures(self) -> list[str]:
        return self._rows(FAIL)

    def refusals(self) -> list[str]:
        return self._rows(REFUSED)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "model_type": self.model_type,
            "ok": self.ok,
            "sections": {s.key: s.to_dict() for s in self.sections},
        }
