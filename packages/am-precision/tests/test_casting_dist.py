import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("_dist_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.dist
def test_fsdp2_sharded_cast_on_gloo(tmp_path):
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2")
        env.update(LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(tmp_path)], env=env))
    for p in procs:
        assert p.wait(timeout=240) == 0
    for rank in range(2):
        out = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert out["dtensor"] and out["placements_kept"]
        fp32 = {n for n, d in out["dtypes"].items() if d == "float32"}
        assert fp32 == {"router.weight", "router.bias"}  # strict keyword, its own FSDP unit
        assert all(d == "bfloat16" for n, d in out["dtypes"].items() if n not in fp32)
        # Non-strict "norm" applies to float16 only (transformers' rule): nothing of it stays fp32 in bf16.
        assert out["buffers"]["norm.scale"] == "bfloat16"
        assert out["buffers"]["norm_scale"] == "bfloat16"
        # float16: once sharded only its buffers stay fp32; "norm_scale" is not the segment "norm".
        assert out["fp16_buffers"]["norm.scale"] == "float32"
        assert out["fp16_buffers"]["norm_scale"] == "float16"
        fp16_kept = {n for n, d in out["fp16_dtypes"].items() if d == "float32"}
        assert fp16_kept == {"router.weight", "router.bias"}
        assert out["router_exact"] and out["finite"] and out["router_grad_dtype"] == "float32"
        assert "shares the FSDP2 unit" in out["mixed_error"] and out["mixed_untouched"]
