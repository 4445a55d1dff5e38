"""Assembly of a run from a config, and the one skeleton every stage runs in.

The builders turn config sections into the parts of a run: data (``build_data``), model,
optimizer and schedule (``optimizer_kwargs`` / ``scheduler_kwargs`` feed timm's factories, as timm's
``train.py`` does), stage one's step. The skeleton is ``open_stage`` (runtime, data, mixed
precision) then ``run_stage`` (run directory, loop, resume, training, ``eval.json``); between the
two a stage builds what differs (model, optimizer, schedule, step, evaluation, hooks) and hands it
to ``run_stage``. The stages themselves are ``dsnet.train.stage_one.train_supernet``,
``dsnet.train.stage_two.train_gate`` and ``dsnet.prune.baselines.train_static``: what the
``dsnet train-*`` commands call; tests call them directly. This module imports none of them.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from dsnet import data as dsdata
from dsnet.config import BEST_METRICS, Config, replace
from dsnet.errors import UserError
from dsnet.models.spec import create
from dsnet.train.engine import (Loop, Runtime, TrainingError, autocast_factory, loop_kwargs, prepare_run_dir,
                                record_config, setup_runtime, updates_per_epoch)
from dsnet.train.evaluate import format_report
from dsnet.train.ieb import IEBStep
from dsnet.train.logs import ConsoleLog

__all__ = ["Data", "build_data", "build_val_loader", "build_model", "build_optimizer", "build_scheduler",
           "optimizer_kwargs", "scheduler_kwargs", "build_criterion", "build_ieb_step", "BEST_METRICS", "best_metric",
           "scaled_lr", "to_channels_last", "wrap_ddp", "updates_per_epoch", "holdout_split", "Setup", "resolve_resume",
           "open_stage", "run_stage",
           "input_shape", "write_eval", "data_signature"]


@dataclass
class Data:
    train: Any          # loader of augmented training batches (a DataLoader, or a DeviceLoader: dsnet.data)
    val: Any            # loader of validation batches
    calib: Any          # training images with training transforms, the same batches on every rank (pruning)
    classes: list[str]
    holdout: Any = None  # training images held back from training, evaluation transforms, every rank all of them
    calib_shard: Any = None  # under DDP: calib's images sharded over the ranks (BN recalibration splits its batches)


def _datasets(cfg: Config, runtime: Runtime, split: str, train_transform: bool) -> Any:
    d = cfg.data
    tf = dsdata.build_transforms(d.input_size, train_transform, auto_augment=d.auto_augment if train_transform else None,
                                 reprob=d.reprob if train_transform else 0.0, interpolation=d.interpolation,
                                 crop_pct=d.crop_pct, uint8=dsdata.normalizes_on_device(d.normalize_on, runtime.device))
    length = d.synthetic_train_size if split == "train" else d.synthetic_val_size
    return dsdata.build_dataset(d.name, d.root, split, tf, length=length, num_classes=d.synthetic_classes,
                                seed=d.synthetic_seed, image_size=d.input_size, skip_bad_images=d.skip_bad_images,
                                check_files=True)


def _loader(cfg: Config, runtime: Runtime, dataset: Any, batch_size: int, training: bool, distributed: bool) -> Any:
    """A loader of ``dataset`` (from ``_datasets``; ``training``: shuffled, with the training transforms);
    on the GPU input path (``data.normalize_on``) a ``DeviceLoader`` that normalises, and for training
    transforms erases, on the run's device, as the workers would have."""
    d, on_device = cfg.data, None
    if dsdata.normalizes_on_device(d.normalize_on, runtime.device):
        mean, std = dsdata.default_normalization(d.input_size)
        on_device = dsdata.DeviceTransforms(runtime.device, mean, std, d.reprob if training else 0.0)
    return dsdata.build_loader(dataset, batch_size, training, num_workers=d.num_workers, distributed=distributed,
                               seed=cfg.train.seed, pin_memory=runtime.device.type == "cuda", on_device=on_device)


def build_val_loader(cfg: Config, runtime: Runtime) -> tuple[Any, list[str]]:
    """The validation loader of ``cfg.data`` and its class names."""
    val_set = _datasets(cfg, runtime, "val", False)
    bs = cfg.data.val_batch_size or cfg.train.batch_size
    return _loader(cfg, runtime, val_set, bs, False, runtime.distributed), list(val_set.classes)


def holdout_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(kept, held back) indices of an ``n``-image training set: a seeded random ``fraction``
    (at least one image when the fraction is positive) is held back; both lists sorted."""
    if fraction <= 0:
        return list(range(n)), []
    count = min(n - 1, max(1, round(n * fraction)))
    held = sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:count].tolist())
    chosen = set(held)
    return [i for i in range(n) if i not in chosen], held


def build_data(cfg: Config, runtime: Runtime, holdout: float = 0.0) -> Data:
    """Training, validation and calibration loaders for ``cfg.data``; with ``holdout`` > 0 that
    fraction of the training images is left out of training and served by ``Data.holdout``."""
    train_set = _datasets(cfg, runtime, "train", True)
    val, classes = build_val_loader(cfg, runtime)
    if list(train_set.classes) != classes:
        raise dsdata.DataError(f"the train and val splits of {cfg.data.root} have different classes")
    bs = cfg.train.batch_size
    kept, held = holdout_split(len(train_set), holdout, cfg.train.seed)
    _check_one_batch(len(kept), bs, runtime.world_size, holdout if held else 0.0)
    held_loader = None
    if held:
        train_set = torch.utils.data.Subset(train_set, kept)
        plain = torch.utils.data.Subset(_datasets(cfg, runtime, "train", False), held)
        held_loader = _loader(cfg, runtime, plain, cfg.data.val_batch_size or bs, False, False)
    # recalibration sees what training saw (augmented images): statistics of un-augmented images
    # cost ds_resnet20 on CIFAR-10 3 points of top-1 (docs/results.md)
    shard = _loader(cfg, runtime, train_set, bs, True, True) if runtime.distributed else None
    return Data(_loader(cfg, runtime, train_set, bs, True, runtime.distributed), val,
                _loader(cfg, runtime, train_set, bs, True, False), classes, held_loader, shard)


def _check_one_batch(images: int, batch_size: int, world_size: int, holdout: float) -> None:
    """Refuse a training set of fewer images per process than one batch: the loader drops the last
    partial batch, so every epoch would train no step and the run would end untrained."""
    if images // world_size >= batch_size:
        return
    left = f"gate.holdout={holdout} leaves {images} training images" if holdout else f"the training set has {images} images"
    shared = f" ({images // world_size} for each of {world_size} processes)" if world_size > 1 else ""
    raise dsdata.DataError(f"{left}{shared}, fewer than one batch of train.batch_size={batch_size}, so no step would "
                           f"train; lower train.batch_size{' or gate.holdout' if holdout else ''}")


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The supernet named by ``cfg.model`` with the dataset's number of classes."""
    m = cfg.model
    if m.num_classes is not None and m.num_classes != num_classes:
        raise UserError(f"model.num_classes={m.num_classes} but the dataset has {num_classes} classes")
    return create(m.name, {"num_classes": num_classes, "drop_rate": m.drop_rate, **m.kwargs},
                  "the config's model (model.name, model.kwargs)")


def build_optimizer(model_or_params: Any, opt: str, lr: float, weight_decay: float, momentum: float,
                    nesterov: bool) -> torch.optim.Optimizer:
    """timm's optimizer factory; no weight decay on biases and norm weights."""
    if opt == "sgd" and not nesterov:
        opt = "momentum"  # timm's "sgd" is Nesterov SGD
    return create_optimizer_v2(model_or_params, opt=opt, lr=lr, weight_decay=weight_decay, momentum=momentum)


def build_scheduler(optimizer: torch.optim.Optimizer, sched: str, epochs: int, updates_per_epoch: int,
                    warmup_epochs: float, warmup_lr: float, min_lr: float) -> Any:
    """timm's scheduler factory, stepped per optimizer update (None for a constant lr)."""
    if sched == "none":
        return None
    scheduler, _ = create_scheduler_v2(optimizer, sched=sched, num_epochs=epochs, warmup_epochs=warmup_epochs,
                                       warmup_lr=warmup_lr, min_lr=min_lr, cooldown_epochs=0,
                                       decay_epochs=max(1, epochs // 3), step_on_epochs=False,
                                       updates_per_epoch=updates_per_epoch)
    return scheduler


def optimizer_kwargs(cfg: Config, runtime: Runtime, section: str = "train") -> dict:
    """``build_optimizer``'s keyword arguments from config section ``train`` (stage one, baselines)
    or ``gate`` (stage two; momentum and Nesterov from ``train``), the learning rate scaled to the
    global batch (``scaled_lr``): the adapter timm's ``optimizer_kwargs(cfg)`` is for its factory."""
    s = getattr(cfg, section)
    return {"opt": s.opt, "lr": scaled_lr(cfg, runtime, s.lr, s.lr_base_batch), "weight_decay": s.weight_decay,
            "momentum": cfg.train.momentum, "nesterov": cfg.train.nesterov}


def scheduler_kwargs(cfg: Config, section: str = "train") -> dict:
    """``build_scheduler``'s keyword arguments from config section ``train`` or ``gate`` (epochs
    and warm-up of that section; schedule, warm-up lr and floor from ``train``)."""
    s = getattr(cfg, section)
    return {"sched": cfg.train.sched, "epochs": s.epochs, "warmup_epochs": s.warmup_epochs,
            "warmup_lr": cfg.train.warmup_lr, "min_lr": cfg.train.min_lr}


def best_metric(report: dict, name: str) -> float:
    """The checkpoint-selection metric of a static evaluation report."""
    if name == "top1_largest":
        return report["largest"]["top1"]
    if name == "top1_slimmest":
        return report["static"][0]["top1"]
    return sum(r["top1"] for r in report["static"]) / len(report["static"])


def build_criterion(cfg: Config, mixup: Any) -> nn.Module:
    """The label loss of stage one's largest route and of the baselines: cross-entropy with
    ``train.label_smoothing``, or soft-target cross-entropy under ``mixup`` (which smooths)."""
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def build_ieb_step(cfg: Config, model: nn.Module, train_model: nn.Module, ema: nn.Module | None, mixup: Any = None,
                   autocast: Any = contextlib.nullcontext) -> IEBStep:
    """Stage one's sandwich step as ``cfg`` sets it: ``train_model`` (``model``, DDP-wrapped or
    not) learns, ``ema`` (the EMA module, or None) teaches; the largest route's loss takes
    ``train.label_smoothing`` (soft-target CE under ``mixup``)."""
    return IEBStep(train_model, model.routes, ema, cfg.ieb.teacher, cfg.ieb.num_random, build_criterion(cfg, mixup),
                   autocast)


def scaled_lr(cfg: Config, runtime: Runtime, lr: float, base_batch: int) -> float:
    """``lr`` scaled linearly from ``base_batch`` to the global batch (per-process batch x
    processes x gradient accumulation)."""
    return lr * cfg.train.batch_size * runtime.world_size * cfg.train.grad_accum / base_batch


def to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` with its 4-D weights in channels_last memory format, as ``train.channels_last``
    trains it. A depthwise weight [C, 1, k, k] is laid out the same either way, but autograd hands
    its gradient back with the standard strides, which DDP's gradient buckets (built from the
    parameters' strides) would take as a mismatch: it warns and copies that gradient every step.
    Those weights keep the standard strides."""
    model = model.to(memory_format=torch.channels_last)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 4 and param.shape[1] == 1:
                param.data = param.data.clone(memory_format=torch.contiguous_format)
    return model


def wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when the run is distributed, else itself."""
    if not runtime.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)


# ---- the stage skeleton: stage one, stage two and the baselines run in it ---------------------
@dataclass
class Setup:
    """What every stage starts from (``open_stage``)."""

    runtime: Runtime
    data: Data
    autocast: Callable[[], Any]              # mixed-precision context factory (``autocast_factory``)
    scaler: torch.amp.GradScaler | None


def resolve_resume(cfg: Config) -> Config:
    """``cfg`` with ``train.resume=auto`` made concrete: ``output.dir``'s ``checkpoints/last.pth``
    when the run has one (a requeued or restarted job continues), else None (a fresh start); so
    one command both starts a run and continues it. Other values are returned as they are."""
    if cfg.train.resume != "auto":
        return cfg
    last = Path(cfg.output.dir) / "checkpoints" / "last.pth"
    return replace(cfg, **{"train.resume": str(last) if last.exists() else None})


def open_stage(cfg: Config, holdout: float = 0.0) -> Setup:
    """The runtime (device, process group, seed), the data (``holdout``: ``build_data``) and mixed
    precision of a stage."""
    runtime = setup_runtime(cfg.train.device, cfg.train.seed, cfg.train.deterministic)
    data = build_data(cfg, runtime, holdout)
    return Setup(runtime, data, *autocast_factory(cfg.train.amp, runtime.device))


def run_stage(cfg: Config, setup: Setup, *, start: Callable[[Loop, dict | None], None] | None = None,
              finish: Callable[[Loop], None] | None = None, report: dict | None = None, **parts: Any) -> Path:
    """Run a stage after every check has passed: the run directory, the ``Loop`` of ``parts`` (its
    fields that differ between stages: ``stage``, ``model``, ``train_model``, ``optimizer``,
    ``scheduler``, ``step``, ``evaluate``, ``epochs``, ``extra_state``, ...) resumed from
    ``train.resume``, ``start(loop, resumed state or None)``, the resolved config, training,
    ``finish(loop)``, then ``eval.json`` (the last evaluation with the ``report`` records) and its
    table; what the console shows meanwhile also goes to ``train.log`` (``ConsoleLog``); returns the
    run directory."""
    cfg = resolve_resume(cfg)
    run_dir = prepare_run_dir(cfg, resuming=cfg.train.resume is not None)
    with ConsoleLog(run_dir / "train.log", setup.runtime.is_main, (UserError, OSError, TrainingError)) as console:
        loop = Loop(cfg=cfg, runtime=setup.runtime, train_loader=setup.data.train, run_dir=run_dir,
                    scaler=setup.scaler, **{**loop_kwargs(cfg), **parts})  # a stage's parts may set a loop setting
        resumed = loop.resume(cfg.train.resume) if cfg.train.resume else None
        if start is not None:
            start(loop, resumed)
        if setup.runtime.is_main:
            record_config(cfg, run_dir, resumed is not None)
        loop.run()
        if finish is not None:
            finish(loop)
        if setup.runtime.is_main and loop.last_eval is not None:
            full = {**loop.last_eval.report, **(report or {}), "data": data_signature(cfg, setup.data.classes)}
            write_eval(run_dir / "eval.json", full)
            console.print(format_report(full))
    return run_dir


def input_shape(cfg: Config, model: nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the run's images."""
    return model.in_chans, cfg.data.input_size, cfg.data.input_size




def data_signature(cfg: Config, classes: list[str]) -> dict:
    """What identifies an evaluation set in eval.json: runs compared side by side must share it."""
    d = cfg.data
    sig = {"name": d.name, "root": str(Path(d.root).resolve()) if d.root else None,
           "num_classes": len(classes), "input_size": d.input_size}
    if d.name == "synthetic":
        sig.update(seed=d.synthetic_seed, val_size=d.synthetic_val_size)
    return sig


def write_eval(path: Path, report: dict) -> None:
    """Write an eval.json report (DESIGN.md's format, plus the optional records: after stage two
    ``gate``, ``sweep``, ``cascade``, ``routing_space`` and ``selection`` (``evaluate_gated``,
    ``select_policy``); ``baseline`` (static baselines); ``data`` (``data_signature``))."""
    big = report.get("largest")
    out = {"static": report["static"],
           "largest": {"madds": big["madds"], "top1": big["top1"]} if big else None,
           "dynamic": report.get("dynamic"), "num_samples": report["num_samples"]}
    for key in ("gate", "sweep", "cascade", "routing_space", "selection", "baseline", "data"):
        if report.get(key) is not None:
            out[key] = report[key]
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
