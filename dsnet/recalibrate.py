"""BN recalibration: re-estimate every width's running statistics after stage one.

Switchable BN keeps statistics per width; momentum averages drift toward whichever widths ran
last. Recalibration zeroes them and takes a cumulative (equal-weight) average over
``num_batches`` training batches per route, for the largest route and every static subnet.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

from dsnet.layers import DSBatchNorm2d
from dsnet.models.net import DSNet

__all__ = ["recalibrate_bn"]


@torch.no_grad()
def recalibrate_bn(model: DSNet, loader: Iterable, device: torch.device, num_batches: int,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   momentum: float | None = None) -> None:
    """Recompute the BN statistics of ``model`` in place from ``num_batches`` batches per route:
    their equal-weight average, or with ``momentum`` a running average (the release's 0.1)."""
    bns = [m for m in model.modules() if isinstance(m, DSBatchNorm2d)]
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats(momentum=momentum)
    was_training = model.training
    model.train()
    routes = [model.routes.largest] + model.routes.static_routes
    try:
        for route in routes:
            for i, (x, _) in enumerate(loader):
                if i >= num_batches:
                    break
                with autocast():
                    model(x.to(device, non_blocking=True), subnet=route)
    finally:
        for bn, momentum in zip(bns, momenta):
            bn.momentum = momentum
        model.train(was_training)
