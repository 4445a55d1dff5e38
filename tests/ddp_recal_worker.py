"""Run by test_recalibrate.py under torchrun (gloo): BN recalibration of one supernet with its
batches shared out over the ranks (``recalibrate_run``); rank 0 saves the merged statistics."""
import sys
from pathlib import Path
from types import SimpleNamespace

import timm
import torch
import torch.distributed as dist

import dsnet  # noqa: F401  (registers the models)
from dsnet.train.engine import Runtime
from dsnet.train.recalibrate import recalibrate_run

if __name__ == "__main__":
    out, num_batches = Path(sys.argv[1]), int(sys.argv[2])
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.25, 0.5), width_mults=(0.125, 0.25, 0.5))
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 3, 16, 16, generator=g) * (1 + i), None) for i in range(num_batches)]
    data = SimpleNamespace(calib=None, calib_shard=batches[rank::world])  # this rank's shard of the calibration set
    recalibrate_run(model, data, Runtime(torch.device("cpu"), rank, world), num_batches)
    if rank == 0:
        torch.save({k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k},
                   out / "merged.pt")
    dist.destroy_process_group()
