"""Run by test_runs.py under torchrun: stage one on a training set whose images are all one
picture, recording per rank the indices its sampler drew each epoch and every batch it trained on,
so the test sees how ranks augment (the only thing that can tell their batches apart) and how the
order moves from epoch to epoch."""
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from dsnet.config import load_config
from dsnet.data import SyntheticImages
from dsnet.train.ieb import IEBStep
from dsnet.train.stage_one import train_supernet

if __name__ == "__main__":
    out = Path(sys.argv[1])
    record = {"indices": [], "batches": []}
    picture = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))  # no symmetry a flip keeps
    render, draw, step = SyntheticImages.render, DistributedSampler.__iter__, IEBStep.__call__

    def one_picture(self, index):
        img, label = render(self, index)
        return (picture.clone() if self.split == "train" else img), label

    def drawn(self):
        indices = list(draw(self))
        record["indices"].append(indices)
        return iter(indices)

    def recorded(self, x, *args, **kwargs):
        record["batches"].append(x.clone())
        return step(self, x, *args, **kwargs)

    SyntheticImages.render, DistributedSampler.__iter__, IEBStep.__call__ = one_picture, drawn, recorded
    train_supernet(load_config(None, sys.argv[2:] + ["train.recalibrate_bn=false"]))
    torch.save(record, out / f"rank{dist.get_rank()}.pt")
    dist.destroy_process_group()
