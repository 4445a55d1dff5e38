"""Run by test_sgs.py under torchrun (2 ranks, gloo): one SGSStep per rank on its own batch; the
width head's gradient on every rank must be the mean of the gradients one process computes on
each rank's batch alone. Writes ``rank{r}.pt`` with both."""
import sys
from pathlib import Path

import timm
import torch
import torch.distributed as dist

from dsnet.train.sgs import SGSStep


def gradients(model, x, y) -> dict:
    head = model.gate.width_head
    head.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same Gumbel noise in and out of the process group
    step = SGSStep(model, torch.tensor([0.25, 0.5, 1.0]), rule="slimmest", sgs_weight=1.0, task_weight=1.0,
                   complexity_weight=0.5, complexity_target=0.0, gumbel_tau=1.0, balance=True)
    step(x, y, torch.Generator(), lambda loss: loss.backward())
    return {k: p.grad.clone() for k, p in head.named_parameters()}


if __name__ == "__main__":
    out = Path(sys.argv[1])
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.5, 1.0), width_mults=(0.25, 0.5, 1.0),
                              routing_space=(0, 1, 2)).eval()
    model.requires_grad_(False).gate.width_head.requires_grad_(True)
    with torch.no_grad():
        model.gate.width_head.weight.normal_()
    batches = []
    for r in range(2):
        g = torch.Generator().manual_seed(100 + r)
        batches.append((torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)))
    alone = [gradients(model, x, y) for x, y in batches]  # before the process group: no all-reduce
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    together = gradients(model, *batches[rank])
    torch.save({"alone": alone, "together": together}, out / f"rank{rank}.pt")
    dist.destroy_process_group()
