"""Run by test_ddp_eval.py under torchrun: stage one, stage two, a Scratch-E baseline and
``dsnet evaluate --sweep`` of the gate, all in one process group; each writes its eval.json."""
import sys
from pathlib import Path

import torch.distributed as dist

from dsnet.prune.baselines import train_static
from dsnet.cli import main as dsnet_main
from dsnet.config import load_config
from dsnet.train.stage_two import train_gate
from dsnet.train.stage_one import train_supernet

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    cfg = load_config(None, overrides + [f"output.dir={out}"])
    run = train_supernet(cfg)
    dist.barrier()  # every rank reads the checkpoint rank 0 finished writing
    gate = train_gate(cfg, run / "checkpoints" / "last.pth")
    dist.barrier()
    train_static(cfg, 0, "scratch-e")
    dist.barrier()
    dsnet_main(["evaluate", str(gate / "checkpoints" / "last.pth"), "--sweep", "3",
                "--json", str(out / "sweep.json")])
    assert not dist.is_initialized()  # the command left the process group at its end
