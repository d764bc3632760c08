"""One architecture in its own process: `python -m tests.zoo.child ARCH --checks a,b --out FILE`.

Writes one JSON object per line to FILE as it goes (``start`` before each check, ``result`` after), so the
parent can tell which check hung or killed the process and rerun the rest in a fresh child.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings


def _emit(out, record: dict) -> None:
    out.write(json.dumps(record, default=str) + "\n")
    out.flush()
    os.fsync(out.fileno())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("arch")
    parser.add_argument("--checks", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    warnings.filterwarnings("ignore")

    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)

    from . import checks as C
    from .tiny import TinyBuildError

    names = [c for c in args.checks.split(",") if c]
    with open(args.out, "a", encoding="utf-8") as out:
        start = time.monotonic()
        try:
            model = C.Model(args.arch)
            # the plain model must run a forward on input_ids, else nothing can be compared
            plain = model.build(model.default_attn())
            with torch.no_grad():
                C.forward(plain, model.plain_ids)
            del plain
            _emit(out, {"event": "built", "info": model.info, "model_type": model.model_type,
                        "seconds": time.monotonic() - start})  # fmt: skip
        except Exception as exc:
            if isinstance(exc, TinyBuildError):
                why = f"no tiny model: {exc}"
            elif "model" in locals():
                why = f"plain forward on input_ids fails: {C.describe(exc, 240)}"
            else:
                why = f"tiny model does not build: {C.describe(exc, 240)}"
            for name in names:
                _emit(out, {"event": "result", **C.Verdict(name, "skip", why).as_dict()})
            return 0
        for name in names:
            _emit(out, {"event": "start", "check": name})
            t = time.monotonic()
            try:
                verdict = C.run_check(model, name)
            except BaseException as exc:  # every outcome is a verdict
                if isinstance(exc, KeyboardInterrupt):
                    raise
                verdict = C.classify_exception(name, exc)
            verdict.seconds = round(time.monotonic() - t, 3)
            verdict.info.setdefault("model_type", model.model_type)
            _emit(out, {"event": "result", **verdict.as_dict()})
    return 0


if __name__ == "__main__":
    sys.exit(main())
