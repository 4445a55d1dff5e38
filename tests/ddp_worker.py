"""Run by test_runs.py under torchrun: stage one; each rank saves its final weights and the
sandwich (routes) it trained at every step."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsnet.config import load_config
from dsnet.train.ieb import IEBStep
from dsnet.train.stage_one import train_supernet

if __name__ == "__main__":
    out = Path(sys.argv[1])
    captured = {"plans": []}
    import dsnet.train.engine as engine

    original_run, original_plan = engine.Loop.run, IEBStep.plan

    def run(self):
        result = original_run(self)
        captured["state"] = {k: v.clone() for k, v in self.model.state_dict().items() if "running" not in k
                             and "num_batches" not in k}
        return result

    def plan(self, generator):
        routes = original_plan(self, generator)
        captured["plans"].append(routes)
        return routes

    engine.Loop.run, IEBStep.plan = run, plan
    train_supernet(load_config(None, sys.argv[2:] + ["train.recalibrate_bn=false"]))
    torch.save(captured, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
