"""Distributed evaluation: two gloo ranks on a validation set of odd size report what one process
reports for the same checkpoint, exactly.

Kept apart from the evaluation tests: it starts two processes with torchrun
(``tests/ddp_eval_worker.py``) and trains both stages first."""
import json
import os
import subprocess
import sys

import pytest
import torch

from dsnet.cli import main as dsnet_main
from tests.test_runs import ROOT, TINY

VAL = ["data.synthetic_train_size=48", "data.synthetic_val_size=37", "data.val_batch_size=8", "train.batch_size=8",
       "train.epochs=1"]


def _single_process(checkpoint, path, *extra):
    assert dsnet_main(["evaluate", str(checkpoint), "--json", str(path), *extra]) == 0
    return json.loads(path.read_text())


def _figures(report):
    """Everything a report counts. The cascade's thresholds are quantiles of per-image confidences,
    which differ in the last float bits when the images sit in other batches (the margin, a
    difference of two probabilities, by up to ~1e-7 absolute): compared apart."""
    cascade = [{k: v for k, v in row.items() if k != "threshold"} for row in report.get("cascade") or []]
    return {**{k: report.get(k) for k in ("static", "largest", "dynamic", "num_samples", "gate", "sweep")},
            "cascade": cascade}


def _thresholds(report):
    return [row["threshold"] for row in report.get("cascade") or []]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_rank_evaluation_of_every_stage_equals_one_process_on_an_odd_sized_set(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29547",
           str(ROOT / "tests" / "ddp_eval_worker.py"), str(run), *TINY, *VAL]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for name, sub in [("supernet", run), ("gate", run / "gate"), ("baseline", run / "scratch-e-subnet0")]:
        distributed = json.loads((sub / "eval.json").read_text())
        single = _single_process(sub / "checkpoints" / "last.pth", tmp_path / f"{name}.json")
        assert single["num_samples"] == 37, name
        assert _figures(distributed) == _figures(single), name
        assert _thresholds(distributed) == pytest.approx(_thresholds(single), rel=1e-6, abs=1e-6), name
    sweep = json.loads((run / "sweep.json").read_text())
    assert sweep["dynamic"]["routing"] and len(sweep["sweep"]) == 3
    single = _single_process(run / "gate" / "checkpoints" / "last.pth", tmp_path / "sweep1.json", "--sweep", "3")
    assert _figures(sweep) == _figures(single)
