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
import torch.distributed as dist

from dsnet.config import check_root_used
from dsnet.errors import UserError
from dsnet.layers import DSBatchNorm2d
from dsnet.models.net import DSNet
from dsnet.train.checkpoint import save_checkpoint
from dsnet.train.engine import Runtime, autocast_factory, load_run
from dsnet.train.metrics import Progress
from dsnet.train.runs import Data, build_data

__all__ = ["recalibrate_bn", "merge_bn_statistics", "recalibrate_run", "recalibrate_command"]


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


@torch.no_grad()
def merge_bn_statistics(model: DSNet) -> None:
    """Under DDP, make every rank's BN statistics the equal-weight average over all ranks'
    batches: each rank averaged its own share (``recalibrate_bn`` with ``momentum=None``), so the
    batch-count-weighted mean of the ranks' averages is the average over every batch. Widths no
    rank ran keep their reset statistics."""
    for bn in (m for m in model.modules() if isinstance(m, DSBatchNorm2d)):
        counts = bn.num_batches_tracked.to(bn.running_mean.dtype)
        total = counts.clone()
        dist.all_reduce(total)
        seen = total > 0
        for buf in (bn.running_mean, bn.running_var):
            summed = buf * counts[:, None]
            dist.all_reduce(summed)
            buf[seen] = summed[seen] / total[seen, None]
        bn.num_batches_tracked.copy_(total.to(bn.num_batches_tracked.dtype))


def recalibrate_run(model: DSNet, data: Data, runtime: Runtime, num_batches: int,
                    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                    momentum: float | None = None) -> None:
    """``recalibrate_bn`` for a run of one or many processes. Under DDP with the equal-weight
    average, the ``num_batches`` batches per route are shared out over the ranks (each runs its
    share of ``data.calib_shard``, then ``merge_bn_statistics``), so no rank repeats another's work;
    a running average (``momentum``) depends on the batches' order and runs whole on every rank."""
    if runtime.distributed and momentum is None and data.calib_shard is not None:
        share = len(range(runtime.rank, num_batches, runtime.world_size))
        recalibrate_bn(model, data.calib_shard, runtime.device, share, autocast)
        merge_bn_statistics(model)
    else:
        recalibrate_bn(model, data.calib, runtime.device, num_batches, autocast, momentum)


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
    data.calib = Progress(data.calib, "recalibrate", cfg.train.progress and runtime.is_main)
    recalibrate_run(model, data, runtime, batches, autocast, cfg.train.recalibrate_momentum)
    state["model"] = model.state_dict()
    if state.get("ema") is not None:
        ema = load_run(checkpoint, overrides, data_root, use_ema=True, stages=("supernet",))[1]
        recalibrate_run(ema, data, runtime, batches, autocast, cfg.train.recalibrate_momentum)
        state["ema"] = ema.state_dict()
    state["bn_recalibrated"] = True
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, out)
    return f"recalibrated {batches} batches per route -> {out}"
