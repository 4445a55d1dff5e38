"""Stage one: train the slice-able supernet with In-place Ensemble Bootstrapping (IEB).

``train_supernet(cfg)`` is what ``dsnet train-supernet`` and ``train_supernet.py`` call: it builds
the supernet, its optimizer, schedule, EMA teacher and IEB step (``dsnet.train.ieb``) from the
config, runs them in the stage skeleton (``dsnet.train.runs.run_stage``), and after the last epoch
recalibrates every width's BN statistics (``dsnet.train.recalibrate``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import timm

from dsnet import data as dsdata
from dsnet.config import EMA_TEACHERS, Config
from dsnet.errors import UserError
from dsnet.train.checkpoint import init_from_checkpoint
from dsnet.train.engine import Evaluation, Loop
from dsnet.train.evaluate import evaluate_static
from dsnet.train.metrics import Progress
from dsnet.train.recalibrate import recalibrate_run
from dsnet.train.runs import (Setup, best_metric, build_ieb_step, build_model, build_optimizer, build_scheduler,
                              input_shape, open_stage, optimizer_kwargs, resolve_resume, run_stage, scheduler_kwargs,
                              to_channels_last, updates_per_epoch, wrap_ddp)

__all__ = ["train_supernet"]

logger = logging.getLogger(__name__)


def train_supernet(cfg: Config) -> Path:
    """Stage one: train the supernet with IEB; returns the run directory."""
    if cfg.train.eval_ema and cfg.ieb.teacher not in EMA_TEACHERS:
        raise UserError(f"train.eval_ema=true needs an EMA, but ieb.teacher={cfg.ieb.teacher} keeps none "
                         "(use ensemble or ema)")
    cfg = resolve_resume(cfg)
    setup = open_stage(cfg)
    data, runtime = setup.data, setup.runtime
    model = build_model(cfg, len(data.classes)).to(runtime.device)
    if cfg.train.channels_last:
        model = to_channels_last(model)
    if cfg.train.init_from and not cfg.train.resume:  # a resumed run has its own weights
        kept = init_from_checkpoint(model, cfg.train.init_from)
        logger.info("weights from %s%s", cfg.train.init_from, f" (kept as built: {', '.join(kept)})" if kept else "")
    model.gate.width_head.requires_grad_(False)  # stage two trains it
    opt = optimizer_kwargs(cfg, runtime)

    def start(loop: Loop, resumed: dict | None) -> None:  # in the run (and its train.log), before training
        if resumed is not None and resumed.get("bn_recalibrated") and loop.epoch >= loop.epochs:
            loop.extra_state["bn_recalibrated"] = True  # a finished run started again: nothing to redo
        logger.info("lr %.4g: train.lr %g x global batch %d / train.lr_base_batch %d", opt["lr"], cfg.train.lr,
                    cfg.train.batch_size * runtime.world_size * cfg.train.grad_accum, cfg.train.lr_base_batch)

    optimizer = build_optimizer(model, **opt)
    scheduler = build_scheduler(optimizer, updates_per_epoch=updates_per_epoch(data.train, cfg), **scheduler_kwargs(cfg))
    ema = None
    if cfg.ieb.teacher in EMA_TEACHERS:
        ema = timm.utils.ModelEmaV3(model, decay=cfg.ieb.ema_decay, use_warmup=cfg.ieb.ema_warmup)
    train_model = wrap_ddp(model, runtime)
    mixup = dsdata.build_mixup(cfg.data.mixup, cfg.data.cutmix, cfg.train.label_smoothing, len(data.classes))
    step = build_ieb_step(cfg, model, train_model, ema.module if ema is not None else None, mixup, setup.autocast)
    size = input_shape(cfg, model)

    def evaluate(epoch: int) -> Evaluation:
        val = Progress(data.val, "evaluate", cfg.train.progress and runtime.is_main)
        report = evaluate_static(ema.module if cfg.train.eval_ema else model, val, runtime.device, size,
                                 setup.autocast, channels_last=cfg.train.channels_last)
        return Evaluation(report, {"top1_largest": report["largest"]["top1"],
                                   "top1_slimmest": report["static"][0]["top1"]},
                          best_metric(report, cfg.train.best_metric))

    return run_stage(
        cfg, setup, stage="supernet", model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
        step=lambda x, y, g, backward: step(x, y, g, backward), evaluate=evaluate,
        epochs=cfg.train.epochs + cfg.train.cooldown_epochs, ema=ema, mixup=mixup, clip_grad=cfg.train.clip_grad,
        extra_state={"classes": data.classes, "bn_recalibrated": False}, start=start,
        finish=lambda loop: _recalibrate_last(cfg, loop, setup, evaluate), report={"dynamic": None})


def _recalibrate_last(cfg: Config, loop: Loop, setup: Setup, evaluate: Callable[[int], Evaluation]) -> None:
    """After the last epoch of stage one (``train.recalibrate_bn``): recalibrate the BN statistics
    of the supernet and its EMA per width, evaluate again and save (``best.pth`` too when the last
    epoch was the best). A finished run resumed (``train.resume=auto`` run again) was recalibrated
    already: its checkpoint and evaluation stand."""
    if not (cfg.train.recalibrate_bn and loop.epoch == loop.epochs) or loop.extra_state.get("bn_recalibrated"):
        return
    final_is_best = loop.last_eval is not None and loop.last_eval.best_metric == loop.best  # best.pth is this epoch
    for net in [loop.model] + ([loop.ema.module] if loop.ema is not None else []):
        recalibrate_run(net, setup.data, setup.runtime, cfg.train.recalibrate_batches, setup.autocast,
                        cfg.train.recalibrate_momentum)
    loop.sync_buffers()
    loop.extra_state["bn_recalibrated"] = True
    loop.take_evaluation(evaluate(loop.epoch), recalibrated=True)
    loop.log({"stage": "supernet", "epoch": loop.epoch, "recalibrated": True, **loop.last_metrics})
    loop.save(final_is_best)
