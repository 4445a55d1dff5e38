"""Run by test_train.py under torchrun: stage one, then each rank saves its final weights."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dsnet.config import load_config
from dsnet.runs import build_model, train_supernet  # noqa: F401

if __name__ == "__main__":
    out = Path(sys.argv[1])
    captured = {}
    import dsnet.engine as engine

    original = engine.Loop.run

    def run(self):
        result = original(self)
        captured["state"] = {k: v.clone() for k, v in self.model.state_dict().items() if "running" not in k
                             and "num_batches" not in k}
        return result

    engine.Loop.run = run
    train_supernet(load_config(None, sys.argv[2:] + ["train.recalibrate_bn=false"]))
    torch.save(captured["state"], out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
