"""The sweep: every causal-LM architecture of the installed transformers x every package check.

    python -m tests.zoo [--jobs N] [--timeout S] [--only a,b] [--checks ...] [--out docs/support-matrix.md]

Each architecture runs in its own child process. By default the children are forked from this process after
it has imported torch, transformers and the five packages once (``--start fork``): on a loaded 2-core
machine those imports take 20-40 s, which a fresh interpreter per architecture would pay ~200 times. The
fork still isolates every architecture (a copy of the clean, unpatched parent; nothing a check does comes
back). ``--start subprocess`` runs ``python -m tests.zoo.child`` instead (fully fresh interpreters).

A child that exceeds ``--timeout`` seconds or dies is killed/reaped: the check it was in gets
``crash: timed out after S s`` / ``crash: the process died (...)``, and the remaining checks of that
architecture run in a new child. Writes the Markdown matrix to ``--out`` and the raw verdicts to the same
path with ``.json``; exits 1 if any cell is ``silently wrong`` or ``crash``, else 0.
"""

from __future__ import annotations

import argparse
import collections
import json
import multiprocessing
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
KINDS = ("exact", "refused", "silently wrong", "crash", "skip")
ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "PYTHONWARNINGS": "ignore",
}


@dataclass
class Job:
    arch: str
    pending: list[str]
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    built: dict[str, Any] = field(default_factory=dict)
    launches: int = 0
    seconds: float = 0.0


def _forked_child(arch: str, checks: list[str], out: str) -> None:
    os.setpgrp()  # own process group: a kill reaches anything the check started
    from . import child

    code = child.main([arch, "--checks", ",".join(checks), "--out", out])
    sys.stdout.flush()
    os._exit(code)


class Runner:
    def __init__(self, archs: list[str], checks: list[str], jobs: int, timeout: float, start: str,
                 log: bool = True) -> None:  # fmt: skip
        self.jobs = {a: Job(a, list(checks)) for a in archs}
        self.queue = collections.deque(archs)
        self.max_jobs = max(1, jobs)
        self.timeout = timeout
        self.start = start
        self.log = log
        self.tmp = Path(tempfile.mkdtemp(prefix="zoo-"))
        self.running: dict[str, tuple[Any, float, Path]] = {}
        self.done = 0

    def _launch(self, job: Job) -> None:
        job.launches += 1
        out = self.tmp / f"{job.arch}.{job.launches}.jsonl"
        out.touch()
        if self.start == "fork":
            ctx = multiprocessing.get_context("fork")
            proc = ctx.Process(target=_forked_child, args=(job.arch, job.pending, str(out)), daemon=False)
            proc.start()
        else:
            cmd = [sys.executable, "-m", "tests.zoo.child", job.arch, "--checks", ",".join(job.pending),
                   "--out", str(out)]  # fmt: skip
            proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **ENV}, start_new_session=True,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        self.running[job.arch] = (proc, time.monotonic(), out)

    @staticmethod
    def _alive(proc: Any) -> bool:
        return proc.is_alive() if hasattr(proc, "is_alive") else proc.poll() is None

    @staticmethod
    def _exitcode(proc: Any) -> int | None:
        return proc.exitcode if hasattr(proc, "exitcode") else proc.returncode

    @staticmethod
    def _kill(proc: Any) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if hasattr(proc, "join"):
            proc.join(5)
        else:
            proc.wait(5)

    def _collect(self, job: Job, out: Path, reason: str | None) -> None:
        current = None
        for line in out.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by the kill
            if record["event"] == "built":
                job.built = record
            elif record["event"] == "start":
                current = record["check"]
            elif record["event"] == "result":
                job.results[record["check"]] = record
                if record["check"] in job.pending:
                    job.pending.remove(record["check"])
                current = None
        if reason is not None:
            victim = current or (job.pending[0] if job.pending else None)
            if victim is not None:
                stage = "" if current else " (while building the tiny model)"
                job.results[victim] = {"check": victim, "kind": "crash", "detail": reason + stage,
                                       "max_diff": None, "info": {}, "seconds": None}  # fmt: skip
                job.pending.remove(victim)
                if not current:  # the build itself hangs/dies: every other check would too
                    for name in list(job.pending):
                        job.results[name] = {"check": name, "kind": "skip",
                                             "detail": f"not run: building the tiny model {reason}",
                                             "max_diff": None, "info": {}, "seconds": None}  # fmt: skip
                        job.pending.remove(name)

    def run(self) -> dict[str, Job]:
        while self.queue or self.running:
            while self.queue and len(self.running) < self.max_jobs:
                self._launch(self.jobs[self.queue.popleft()])
            time.sleep(0.2)
            for arch, (proc, started, out) in list(self.running.items()):
                job = self.jobs[arch]
                elapsed = time.monotonic() - started
                reason = None
                if self._alive(proc):
                    if elapsed <= self.timeout:
                        continue
                    self._kill(proc)
                    reason = f"timed out after {self.timeout:.0f} s"
                else:
                    if hasattr(proc, "join"):
                        proc.join()
                    code = self._exitcode(proc)
                    if code != 0:
                        reason = f"the process died (exit code {code})"
                del self.running[arch]
                job.seconds += elapsed
                self._collect(job, out, reason)
                if job.pending and reason is None:
                    # exited cleanly without finishing: treat as a death of the next check
                    self._collect(job, out, "the process exited before finishing")
                if job.pending:
                    self.queue.appendleft(arch)
                else:
                    self.done += 1
                    if self.log:
                        cells = ", ".join(f"{c}={job.results[c]['kind']}" for c in job.results)
                        print(
                            f"[{self.done}/{len(self.jobs)}] {arch} ({job.seconds:.0f} s): {cells}",
                            flush=True,
                        )
        return self.jobs


# ------------------------------------------------------------------------------------------- report


def cell(result: dict[str, Any], width: int = 150) -> str:
    from .checks import Verdict

    v = Verdict(result["check"], result["kind"], result.get("detail") or "", result.get("max_diff"))
    text = v.cell().replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


def summarize(jobs: dict[str, Job], checks: list[str]) -> dict[str, dict[str, int]]:
    table = {c: dict.fromkeys(KINDS, 0) for c in checks}
    for job in jobs.values():
        for c in checks:
            if c in job.results:
                table[c][job.results[c]["kind"]] += 1
    return table


def render(jobs: dict[str, Job], checks: list[str], meta: dict[str, Any]) -> str:
    from .checks import CHECKS, LOGITS_ATOL

    summary = summarize(jobs, checks)
    lines = [
        "# Support matrix",
        "",
        "Generated by `python -m tests.zoo` (nox session `zoo`); do not edit by hand. Every entry of "
        f"`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES` of transformers {meta['transformers']} ({len(jobs)} "
        f"architectures), each a tiny random-weight model built from its default config class, shrunk "
        "generically (`tests/zoo/tiny.py`); fp32 on CPU; torch "
        f"{meta['torch']}, Python {meta['python']}.",
        "",
        "What each column compares (logits, max abs diff <= "
        f"{LOGITS_ATOL:g} is exact; see `tests/zoo/checks.py`):",
        "",
        "- am-packing (backend): one packed row of 3 documents (`pack_sequences`, `enable_packing(model, "
        "backend)`) vs each document alone through the unpatched model, on real tokens; `configure_packing"
        "(backend)` runs on a fresh copy too and a wrong or crashing result there is the cell's verdict;",
        "- am-attention: `inject_te_attention` with the SDPA `ReferenceDotProductAttention` vs plain "
        "(modules taken / candidates, kernel calls); nothing taken = refused;",
        "- am-pipelining: `split_model_into_stages(model, 2)` chained in one process vs the unsplit model;",
        "- am-kernels: `patch_liger_kernel` with torch reference ops vs plain, then the undo restores the "
        "exact logits and an empty patch report;",
        "- am-precision: `cast_model_to_dtype(bf16)`: the fp32-kept parameters equal those transformers keeps "
        "loading the model with `dtype=torch.bfloat16`, and a bf16 forward runs.",
        "",
        "Kinds: `exact`; `refused: reason` (the package raised ValueError/RuntimeError/NotImplementedError "
        "from its own code before giving a result); `silently wrong (max diff …)`; `crash: error` (any other "
        "exception, a hang past the timeout or a dead process); `skip: why` (no tiny model, or the check "
        "cannot run on it).",
        "",
        "## Summary",
        "",
        "| package | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for c in checks:
        lines.append(f"| {CHECKS[c][0]} | " + " | ".join(str(summary[c][k]) for k in KINDS) + " |")
    lines += [
        "",
        f"Sweep: {meta['wall_seconds']:.0f} s wall with {meta['jobs']} jobs on {meta['cpus']} CPUs "
        f"(timeout {meta['timeout']:.0f} s per child).",
        "",
        "## Matrix",
        "",
        "| architecture | " + " | ".join(CHECKS[c][0] for c in checks) + " |",
        "|---|" + "---|" * len(checks),
    ]
    for arch in sorted(jobs):
        job = jobs[arch]
        row = [cell(job.results[c]) if c in job.results else "not run" for c in checks]
        lines.append(f"| {arch} | " + " | ".join(row) + " |")
    lines.append("")
    return "\n".join(lines)


def _select(only: str | None, exclude: str | None) -> list[str]:
    from .tiny import causal_lm_architectures

    archs = list(causal_lm_architectures())
    if only:
        wanted = [a.strip() for a in only.split(",") if a.strip()]
        unknown = [a for a in wanted if a not in archs]
        if unknown:
            raise SystemExit(f"not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES: {unknown}")
        archs = wanted
    if exclude:
        dropped = {a.strip() for a in exclude.split(",")}
        archs = [a for a in archs if a not in dropped]
    return archs


def main(argv: list[str] | None = None) -> int:
    from .checks import CHECKS, DEFAULT_CHECKS

    parser = argparse.ArgumentParser(prog="python -m tests.zoo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="children at a time")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per child before it is killed")
    parser.add_argument("--only", help="comma-separated architectures (model types)")
    parser.add_argument("--exclude", help="comma-separated architectures to leave out")
    parser.add_argument("--checks", default=",".join(DEFAULT_CHECKS),
                        help=f"comma-separated, of {','.join(CHECKS)} (flex compiles for minutes per model on CPU)")  # fmt: skip
    parser.add_argument("--out", default="docs/support-matrix.md", help="Markdown output (JSON next to it)")
    parser.add_argument(
        "--start", choices=("fork", "subprocess"), default="fork" if hasattr(os, "fork") else "subprocess"
    )
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)

    os.environ.update(ENV)
    checks = [c.strip() for c in args.checks.split(",") if c.strip()]
    unknown = [c for c in checks if c not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; known: {list(CHECKS)}")

    import torch
    import transformers

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if args.start == "fork":
        # imported once here, inherited by every forked child
        import transformers.masking_utils
        import transformers.modeling_utils

        import am_attention  # noqa: F401
        import am_kernels  # noqa: F401
        import am_packing  # noqa: F401
        import am_pipelining  # noqa: F401
        import am_precision  # noqa: F401

        from . import checks as _checks  # noqa: F401
    archs = _select(args.only, args.exclude)
    start = time.monotonic()
    jobs = Runner(archs, checks, args.jobs, args.timeout, args.start, log=not args.quiet).run()
    wall = time.monotonic() - start
    meta = {
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
        "wall_seconds": wall,
        "jobs": args.jobs,
        "cpus": os.cpu_count(),
        "timeout": args.timeout,
        "checks": checks,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render(jobs, checks, meta), encoding="utf-8")
    summary = summarize(jobs, checks)
    results = {
        a: {"built": j.built, "checks": j.results, "seconds": round(j.seconds, 1)} for a, j in jobs.items()
    }
    # one line per architecture: small, and a re-run's diff shows which architectures changed
    lines = [
        f"  {json.dumps(a)}: {json.dumps(results[a], default=str, sort_keys=True)}" for a in sorted(results)
    ]
    text = (
        "{\n"
        f' "meta": {json.dumps(meta, default=str)},\n'
        f' "summary": {json.dumps(summary)},\n'
        ' "results": {\n' + ",\n".join(lines) + "\n }\n}\n"
    )
    out.with_suffix(".json").write_text(text, encoding="utf-8")
    bad = [(a, c, r) for a, j in sorted(jobs.items()) for c, r in j.results.items()
           if r["kind"] in ("silently wrong", "crash")]  # fmt: skip
    if not args.quiet:
        print(f"\n{len(archs)} architectures in {wall:.0f} s; matrix: {out}")
        for c in checks:
            print(f"  {c:24s} " + "  ".join(f"{k}={summary[c][k]}" for k in KINDS))
        for arch, check, result in bad:
            print(f"  {arch:28s} {check:16s} {cell(result, 240)}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
