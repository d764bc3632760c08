"""The `am` command: argument parsing and exit codes (0 all checks pass, 1 a check failed, 2 bad input).

The exit codes are defined here only; `am_cli.doctor` imports them.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from .tiny_models import TINY_ARCHS
from .version import __version__

EXIT_OK = 0
EXIT_CHECK_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="am", description="automodel-kit command line")
    parser.add_argument("--version", action="version", version=f"am-cli {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    doctor = sub.add_parser(
        "doctor",
        help="check every am-* package on a tiny model and print a report",
        description="Builds a model from a config (no weights downloaded) and checks attention backends, "
        "TE injection, packing exactness, fp32 casting and pipeline splitting on it.",
    )
    doctor.add_argument(
        "--model",
        default="llama",
        help=f"a built-in tiny architecture ({', '.join(TINY_ARCHS)}), a local model directory (its "
        "config.json is used) or a config JSON file; weights are optional and never loaded",
    )
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")
    doctor.add_argument("--stages", type=int, default=2, help="pipeline stages to plan (default 2)")
    doctor.add_argument(
        "--bench", action="store_true", help="also run a short packing benchmark on the local GPU"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "doctor":
        from .doctor import DoctorInputError, run_doctor

        try:
            return run_doctor(model=args.model, as_json=args.json, stages=args.stages, bench=args.bench)
        except DoctorInputError as exc:
            message = " ".join(str(exc).split())  # one line, whatever the cause said
            print(f"am doctor: error: {message}", file=sys.stderr)
            if args.json:
                print(json.dumps({"ok": False, "error": message, "exit_code": EXIT_USAGE}))
            return EXIT_USAGE
    return EXIT_USAGE  # argparse requires a command; kept for type checkers


if __name__ == "__main__":
    sys.exit(main())
