#!/usr/bin/env bash
# One GPU session on the device machine (no internet there): install the carried wheels, put our packages on
# the path, run tests/gpu and the single-GPU benchmarks. Logs and JSON go to $OUT.
#   .whl/        carried wheels: liger-kernel, transformer-engine (+ torch extension, pydantic, einops, ...)
#   /root/te/    the transformer_engine_cu13 core wheel, joined from parts carried in earlier calls
set -uo pipefail
OUT=${OUT:-/tmp/am-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$(ls -d "$PWD"/packages/*/src | tr '\n' ':')$PWD"

if ! python3 -c "import transformer_engine.pytorch" 2>/dev/null; then
    if ls /root/te/te_cu13.part.* >/dev/null 2>&1; then
        cat /root/te/te_cu13.part.* > /root/te/transformer_engine_cu13-2.20.2-py3-none-manylinux_2_28_x86_64.whl
        python3 -m pip install -q --no-deps --no-index /root/te/transformer_engine_cu13-*.whl
    fi
    python3 -m pip install -q --no-deps --no-index .whl/*.whl
fi
python3 - <<'PY' 2>&1 | tee "$OUT/environment.txt"
import torch, transformers, importlib
print("gpu", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
print("torch", torch.__version__, "transformers", transformers.__version__)
for name in ("transformer_engine.pytorch", "liger_kernel", "flash_attn", "triton"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(importlib.import_module(name.split(".")[0]), "__version__", "?"))
    except Exception as exc:  # report, do not hide: the tests below say what they skip
        print(name, "NOT importable:", type(exc).__name__, str(exc)[:200])
PY
case "${1:-all}" in
  tests|all)
    python3 -m pytest tests/gpu -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log" ;;
esac
case "${1:-all}" in
  bench|all)
    python3 -m benchmarks --only "${BENCH:-packing,attention,precision,liger}" --timeout 240 2>&1 | tee "$OUT/bench.log"
    tar czf "$OUT/results.tgz" benchmarks/results benchmarks/RESULTS.md ;;
esac
