"""benchmarks/device_check.py --smoke: the GPU check's code, run on CPU at tiny sizes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_device_check_smoke_writes_every_row(tmp_path):
    out = tmp_path / "check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "device_check.py"), "--smoke", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] is True and result["device"].startswith("cpu")
    arms = {(r["dtype"], r["channels_last"], r["host_sync"]) for r in result["train_step"]}
    assert arms == {(d, c, s) for d in ("fp32", "bf16") for c in (False, True) for s in (False, True)}
    assert all(r["images_per_s"] > 0 and r["ms"] > 0 for r in result["train_step"])
    paths = {(r["batch_size"], r["path"]) for r in result["inference"]}
    assert paths == {(n, p) for n in (1, 4) for p in ("dynamic", "largest", "slimmest", "cascade")}
    assert all(r["ms"] > 0 for r in result["inference"])
    assert [(r["normalize_on"], r["workers"]) for r in result["loader"]] == [("workers", 1), ("device", 1)]
    assert all(r["images_per_s_per_worker"] > 0 for r in result["loader"])
    ddp = result["ddp"]
    assert (ddp["backend"], ddp["world_size"], ddp["loss_finite"]) == ("gloo", 1, True) and ddp["step_ms"] > 0
    for heading in ("IEB train step", "inference latency", "loader (224 px", "DDP, 1 rank, gloo", f"wrote {out}"):
        assert heading in proc.stdout
