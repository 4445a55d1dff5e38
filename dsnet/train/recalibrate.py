"""BN recalibration: re-estimate every width's running statistics after stage one.

Switchable BN keeps statistics per width; momentum averages drift toward whichever widths ran
last. Recalibration zeroes them and takes a cumulative (equal-weight) average over
``num_batches`` training batches per route, for the largest route and every static subnet.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

from dsnet.config import check_root_used
from dsnet.errors import UserError
from dsnet.layers import DSBatchNorm2d
from dsnet.models.net import DSNet
from dsnet.train.checkpoint import save_checkpoint
from dsnet.train.engine import autocast_factory, load_run
from dsnet.train.metrics import Progress
from dsnet.train.runs import build_data

__all__ = ["recalibrate_bn", "recalibrate_command"]


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


def recalibrate_command(checkpoint: str, output: str | None = None, batches: int | None = None,
                        data_root: str | None = None, overrides: Sequence[str] = ()) -> str:
    """``dsnet recalibrate``: re-estimate every width's BN statistics of a stage-one checkpoint
    (model and EMA) on the run's training data (``data_root`` and ``overrides`` applied to its
    config) and write them as a new checkpoint (default ``recalibrated.pth`` beside it, never
    overwritten); returns a summary line."""
    out = Path(output or Path(checkpoint).with_name("recalibrated.pth"))
    if out.exists():
        raise UserError(f"{out} exists; choose another -o (dsnet never overwrites a checkpoint here)")
    state, model, cfg, runtime = load_run(checkpoint, overrides, data_root, stages=("supernet",))
    check_root_used(cfg, data_root, overrides)
    data = build_data(cfg, runtime)
    autocast, _ = autocast_factory(cfg.train.amp, runtime.device)
    batches = batches or cfg.train.recalibrate_batches
    calib = Progress(data.calib, "recalibrate", cfg.train.progress and runtime.is_main)
    recalibrate_bn(model, calib, runtime.device, batches, autocast, cfg.train.recalibrate_momentum)
    state["model"] = model.state_dict()
    if state.get("ema") is not None:
        ema = load_run(checkpoint, overrides, data_root, use_ema=True, stages=("supernet",))[1]
        recalibrate_bn(ema, calib, runtime.device, batches, autocast, cfg.train.recalibrate_momentum)
        state["ema"] = ema.state_dict()
    state["bn_recalibrated"] = True
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, out)
    return f"recalibrated {batches} batches per route -> {out}"
