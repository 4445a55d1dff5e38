"""Assembly of a run from a config: data, model, optimizer, schedule, and the stage-one job.

``train_supernet(cfg)`` is what ``train_supernet.py`` calls; tests call it directly.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import timm
import torch
from timm.loss import SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import dsnet  # noqa: F401  (registers the models)
from dsnet import data as dsdata
from dsnet.checkpoint import init_from_checkpoint
from dsnet.config import BEST_METRICS, EMA_TEACHERS, Config, save_config
from dsnet.engine import Loop, Runtime, autocast_factory, prepare_run_dir, setup_runtime
from dsnet.errors import UserError
from dsnet.evaluate import evaluate_gated, evaluate_static, format_report
from dsnet.ieb import IEBStep
from dsnet.recalibrate import recalibrate_bn

__all__ = ["Data", "build_data", "build_val_loader", "build_model", "build_optimizer", "build_scheduler", "train_supernet",
           "BEST_METRICS", "best_metric", "train_gate", "bn_recalibrated", "write_eval", "data_signature", "scaled_lr",
           "wrap_ddp", "holdout_split", "head_kwargs", "build_ieb_step", "build_sgs_step"]

if TYPE_CHECKING:
    from dsnet.sgs import SGSStep

logger = logging.getLogger(__name__)


@dataclass
class Data:
    train: Any          # DataLoader of augmented training batches
    val: Any            # DataLoader of validation batches
    calib: Any          # training images with training transforms, one process's share (BN recalibration)
    classes: list[str]
    holdout: Any = None  # training images held back from training, evaluation transforms, every rank all of them


def _datasets(cfg: Config, split: str, train_transform: bool) -> Any:
    d = cfg.data
    tf = dsdata.build_transforms(d.input_size, train_transform, auto_augment=d.auto_augment if train_transform else None,
                                 reprob=d.reprob if train_transform else 0.0, interpolation=d.interpolation,
                                 crop_pct=d.crop_pct)
    length = d.synthetic_train_size if split == "train" else d.synthetic_val_size
    return dsdata.build_dataset(d.name, d.root, split, tf, length=length, num_classes=d.synthetic_classes,
                                seed=d.synthetic_seed, image_size=d.input_size, skip_bad_images=d.skip_bad_images)


def _loader(cfg: Config, runtime: Runtime, dataset: Any, batch_size: int, training: bool, distributed: bool) -> Any:
    return dsdata.build_loader(dataset, batch_size, training, num_workers=cfg.data.num_workers,
                               distributed=distributed, seed=cfg.train.seed, pin_memory=runtime.device.type == "cuda")


def build_val_loader(cfg: Config, runtime: Runtime) -> tuple[Any, list[str]]:
    """The validation loader of ``cfg.data`` and its class names."""
    val_set = _datasets(cfg, "val", False)
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
    train_set = _datasets(cfg, "train", True)
    val, classes = build_val_loader(cfg, runtime)
    if list(train_set.classes) != classes:
        raise dsdata.DataError(f"the train and val splits of {cfg.data.root} have different classes")
    bs = cfg.train.batch_size
    kept, held = holdout_split(len(train_set), holdout, cfg.train.seed)
    held_loader = None
    if held:
        if len(kept) < bs:
            raise dsdata.DataError(f"gate.holdout={holdout} leaves {len(kept)} training images, fewer than one "
                                   f"batch of train.batch_size={bs}; lower gate.holdout or the batch size")
        train_set = torch.utils.data.Subset(train_set, kept)
        plain = torch.utils.data.Subset(_datasets(cfg, "train", False), held)
        held_loader = _loader(cfg, runtime, plain, cfg.data.val_batch_size or bs, False, False)
    # recalibration sees what training saw (augmented images): statistics of un-augmented images
    # cost ds_resnet20 on CIFAR-10 3 points of top-1 (docs/results.md)
    return Data(_loader(cfg, runtime, train_set, bs, True, runtime.distributed), val,
                _loader(cfg, runtime, train_set, bs, True, False), classes, held_loader)


def build_model(cfg: Config, num_classes: int) -> nn.Module:
    """The supernet named by ``cfg.model`` with the dataset's number of classes."""
    m = cfg.model
    if m.name not in dsnet.MODELS:
        raise UserError(f"model.name '{m.name}' is not a dsnet model (accepted: {', '.join(sorted(dsnet.MODELS))})")
    if m.num_classes is not None and m.num_classes != num_classes:
        raise UserError(f"model.num_classes={m.num_classes} but the dataset has {num_classes} classes")
    kwargs = {"num_classes": num_classes, "drop_rate": m.drop_rate, **m.kwargs}
    try:
        return timm.create_model(m.name, **kwargs)
    except (TypeError, ValueError) as err:
        raise UserError(f"model.kwargs {m.kwargs} do not fit {m.name}: {err}") from None


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


def best_metric(report: dict, name: str) -> float:
    """The checkpoint-selection metric of a static evaluation report."""
    if name == "top1_largest":
        return report["largest"]["top1"]
    if name == "top1_slimmest":
        return report["static"][0]["top1"]
    return sum(r["top1"] for r in report["static"]) / len(report["static"])


def _criterion(cfg: Config, mixup: Any) -> nn.Module:
    if mixup is not None:
        return SoftTargetCrossEntropy()
    return nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)


def build_ieb_step(cfg: Config, model: nn.Module, train_model: nn.Module, ema: nn.Module | None, mixup: Any = None,
                   autocast: Any = contextlib.nullcontext) -> IEBStep:
    """Stage one's sandwich step as ``cfg`` sets it: ``train_model`` (``model``, DDP-wrapped or
    not) learns, ``ema`` (the EMA module, or None) teaches; the largest route's loss takes
    ``train.label_smoothing`` (soft-target CE under ``mixup``)."""
    return IEBStep(train_model, model.routes, ema, cfg.ieb.teacher, cfg.ieb.num_random, _criterion(cfg, mixup),
                   autocast)


def build_sgs_step(cfg: Config, model: nn.Module, size: tuple[int, int, int], device: torch.device | str,
                   autocast: Any = contextlib.nullcontext,
                   sampler: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SGSStep:
    """Stage two's SGS step for the frozen ``model`` as ``cfg.gate`` sets it, the routes priced at
    input ``size`` (C, H, W) in ``gate.cost_unit``: GMAdds, or a fraction of the widest route's.
    ``sampler``: the route sample of the task and complexity terms (``SGSStep``; None: Gumbel)."""
    from dsnet.sgs import SGSStep

    g = cfg.gate
    costs = torch.tensor(model.dynamic_costs(size), dtype=torch.float32, device=device)
    costs = costs / (1e9 if g.cost_unit == "gmadds" else costs[-1])
    return SGSStep(model, g.rule, g.sgs_weight, g.task_weight, g.complexity_weight, g.complexity_target,
                   g.gumbel_tau, costs, autocast, g.balance, g.soft_targets, g.label_smoothing, sampler)


def scaled_lr(cfg: Config, runtime: Runtime, lr: float, base_batch: int) -> float:
    """``lr`` scaled linearly from ``base_batch`` to the global batch (per-process batch x
    processes x gradient accumulation)."""
    return lr * cfg.train.batch_size * runtime.world_size * cfg.train.grad_accum / base_batch


def wrap_ddp(model: nn.Module, runtime: Runtime) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel when the run is distributed, else itself."""
    if not runtime.distributed:
        return model
    return DistributedDataParallel(model, device_ids=[runtime.device] if runtime.device.type == "cuda" else None)


def updates_per_epoch(loader: Any, cfg: Config) -> int:
    steps = len(loader)
    if cfg.train.max_steps_per_epoch is not None:
        steps = min(steps, cfg.train.max_steps_per_epoch * cfg.train.grad_accum)
    return max(1, steps // cfg.train.grad_accum)


def train_supernet(cfg: Config) -> Path:
    """Stage one: train the supernet with IEB; returns the run directory."""
    if cfg.train.eval_ema and cfg.ieb.teacher not in EMA_TEACHERS:
        raise UserError(f"train.eval_ema=true needs an EMA, but ieb.teacher={cfg.ieb.teacher} keeps none "
                         "(use ensemble or ema)")
    runtime = setup_runtime(cfg.train.device, cfg.train.seed, cfg.train.deterministic)
    data = build_data(cfg, runtime)
    model = build_model(cfg, len(data.classes)).to(runtime.device)
    run_dir = prepare_run_dir(cfg, resuming=cfg.train.resume is not None)  # after every check
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.train.init_from and not cfg.train.resume:  # a resumed run has its own weights
        kept = init_from_checkpoint(model, cfg.train.init_from)
        logger.info("weights from %s%s", cfg.train.init_from, f" (kept as built: {', '.join(kept)})" if kept else "")
    model.gate.width_head.requires_grad_(False)  # stage two trains it
    lr = scaled_lr(cfg, runtime, cfg.train.lr, cfg.train.lr_base_batch)
    optimizer = build_optimizer(model, cfg.train.opt, lr, cfg.train.weight_decay, cfg.train.momentum,
                                cfg.train.nesterov)
    steps = updates_per_epoch(data.train, cfg)
    scheduler = build_scheduler(optimizer, cfg.train.sched, cfg.train.epochs, steps, cfg.train.warmup_epochs,
                                cfg.train.warmup_lr, cfg.train.min_lr)
    autocast, scaler = autocast_factory(cfg.train.amp, runtime.device)
    ema = None
    if cfg.ieb.teacher in EMA_TEACHERS:
        ema = timm.utils.ModelEmaV3(model, decay=cfg.ieb.ema_decay, use_warmup=cfg.ieb.ema_warmup)
    train_model = wrap_ddp(model, runtime)
    mixup = dsdata.build_mixup(cfg.data.mixup, cfg.data.cutmix, cfg.train.label_smoothing, len(data.classes))
    step = build_ieb_step(cfg, model, train_model, ema.module if ema is not None else None, mixup, autocast)
    size = (model.in_chans, cfg.data.input_size, cfg.data.input_size)

    def evaluate(epoch: int) -> dict:
        report = evaluate_static(ema.module if cfg.train.eval_ema else model, data.val, runtime.device, size,
                                 autocast, channels_last=cfg.train.channels_last)
        return {"eval": report, "top1_largest": report["largest"]["top1"],
                "top1_slimmest": report["static"][0]["top1"], "best_metric": best_metric(report, cfg.train.best_metric)}

    loop = Loop(cfg, runtime, "supernet", model, train_model, optimizer, scheduler,
                lambda x, y, g, backward: step(x, y, g, backward), evaluate, data.train,
                cfg.train.epochs + cfg.train.cooldown_epochs, run_dir, ema=ema, scaler=scaler, mixup=mixup,
                clip_grad=cfg.train.clip_grad,
                extra_state={"classes": data.classes, "bn_recalibrated": False})
    if cfg.train.resume:
        loop.resume(cfg.train.resume)
    if runtime.is_main:
        save_config(cfg, run_dir / "config.yaml")
    loop.run()
    if cfg.train.recalibrate_bn and loop.epoch == loop.epochs:
        final_is_best = loop.last_metrics.get("best_metric") == loop.best  # best.pth is this epoch
        for net in [model] + ([ema.module] if ema is not None else []):
            recalibrate_bn(net, data.calib, runtime.device, cfg.train.recalibrate_batches, autocast,
                           cfg.train.recalibrate_momentum)
        loop.sync_buffers()
        loop.extra_state["bn_recalibrated"] = True
        loop.last_metrics = {**loop.last_metrics, **evaluate(loop.epoch), "recalibrated": True}
        loop.log({"stage": "supernet", "epoch": loop.epoch, "recalibrated": True, **loop.last_metrics})
        loop.save(final_is_best)
    if runtime.is_main and "eval" in loop.last_metrics:
        write_eval(run_dir / "eval.json", {**loop.last_metrics["eval"], "dynamic": None,
                                           "data": data_signature(cfg, data.classes)})
        print(format_report(loop.last_metrics["eval"]))
    return run_dir


def _gate_run_dir(cfg: Config, supernet_path: Path) -> Config:
    """Stage two writes beside stage one: ``<output.dir>/gate`` when output.dir is the supernet's run."""
    from dsnet.config import replace

    out = Path(cfg.output.dir).resolve()
    if out == supernet_path.resolve().parent.parent:
        return replace(cfg, **{"output.dir": str(Path(cfg.output.dir) / "gate")})
    return cfg


def _check_supernet(cfg: Config, state: dict, path: Path, classes: list[str]) -> None:
    """Refuse a supernet checkpoint that does not match the config or the data."""
    if state["model_name"] != cfg.model.name:
        raise UserError(f"--supernet {path} holds {state['model_name']}, but model.name is {cfg.model.name}")
    def plain(kwargs: dict) -> dict:  # tuples and lists compare equal; the gate's routing space may change,
        # and how the weights were initialised is no property of trained (or converted) weights
        return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items() if k not in ("routing_space", "init")}

    built = plain(dict(state["model_kwargs"]))
    if any(built.get(k) != v for k, v in plain(cfg.model.kwargs).items()):
        raise UserError(f"--supernet {path} was built with {built}, but model.kwargs asks for "
                         f"{dict(cfg.model.kwargs)}")
    if state.get("classes") is not None and list(state["classes"]) != classes:
        raise UserError(f"--supernet {path} was trained on {len(state['classes'])} classes "
                         f"({', '.join(state['classes'][:4])}, ...), the data has {len(classes)} "
                         f"({', '.join(classes[:4])}, ...)")


def bn_recalibrated(state: dict) -> bool:
    """Whether a stage-one checkpoint holds recalibrated BN statistics (``bn_recalibrated``; older
    checkpoints tell it by the ``recalibrated`` mark of their last metrics)."""
    return bool(state.get("bn_recalibrated", (state.get("metrics") or {}).get("recalibrated", False)))


def _recalibrate_supernet(cfg: Config, loop: Loop, calib: Any, supernet: Path, autocast: Any) -> None:
    """Recalibrate the BN statistics of a supernet saved before recalibration (a ``best.pth`` of
    an earlier epoch, a run with ``train.recalibrate_bn=false``) before its gate trains on them;
    with ``train.recalibrate_bn=false`` keep them and warn."""
    if not cfg.train.recalibrate_bn:
        logger.warning("--supernet %s holds BN statistics from before recalibration (train.recalibrate_bn=false)",
                       supernet)
        return
    logger.info("--supernet %s was saved before BN recalibration: recalibrating it first", supernet)
    recalibrate_bn(loop.model, calib, loop.runtime.device, cfg.train.recalibrate_batches, autocast,
                   cfg.train.recalibrate_momentum)
    loop.sync_buffers()
    if loop.ema is not None:  # the EMA starts from the recalibrated supernet
        loop.ema.set(loop.model)
    loop.extra_state["bn_recalibrated"] = True


def _gate_model(cfg: Config, state: dict) -> nn.Module:
    """The frozen supernet of ``state`` with the routing space and width head stage two trains."""
    from dsnet.checkpoint import build_model as rebuild

    model = rebuild(state)
    space = cfg.gate.routing_space or model.routing_space
    if max(space) >= model.num_subnets:
        raise UserError(f"gate.routing_space {list(space)} is outside the supernet's {model.num_subnets} "
                         f"static subnets (0..{model.num_subnets - 1})")
    model.set_routing_space(space)
    if head_kwargs(cfg):  # the published fc head is the one the supernet was built with
        model.set_width_head(cfg.gate.head, cfg.gate.head_hidden, cfg.gate.head_dropout)
    model.model_kwargs = {**model.model_kwargs, "routing_space": tuple(space), **head_kwargs(cfg)}
    model.requires_grad_(False).eval()
    model.gate.width_head.requires_grad_(True)
    if cfg.gate.logit_bias is not None:
        with torch.no_grad():
            model.gate.width_head.bias.copy_(torch.tensor(cfg.gate.logit_bias))
    return model


def head_kwargs(cfg: Config) -> dict:
    """Model kwargs that rebuild stage two's width head (none for the published ``fc`` head)."""
    g = cfg.gate
    return {} if g.head == "fc" else {"gate_head": g.head, "gate_hidden": g.head_hidden, "gate_dropout": g.head_dropout}


def train_gate(cfg: Config, supernet: str | Path) -> Path:
    """Stage two: train the gate's width head with SGS on a frozen supernet, then choose the
    deployment policy on the held-back training images (``dsnet.policy``); returns the run dir."""
    from dsnet.checkpoint import read_checkpoint

    supernet = Path(supernet)
    state = read_checkpoint(supernet, "supernet")
    cfg = _gate_run_dir(cfg, supernet)
    model = _gate_model(cfg, state)
    if cfg.train.eval_ema and cfg.gate.ema_decay is None:
        raise UserError("train.eval_ema=true needs an EMA of the gate in stage two: "
                         "set gate.ema_decay (release: 0.997)")
    runtime = setup_runtime(cfg.train.device, cfg.train.seed, cfg.train.deterministic)
    data = build_data(cfg, runtime, cfg.gate.holdout)
    _check_supernet(cfg, state, supernet, data.classes)
    run_dir = prepare_run_dir(cfg, resuming=cfg.train.resume is not None)  # after every check
    model = model.to(runtime.device)
    size = (model.in_chans, cfg.data.input_size, cfg.data.input_size)
    lr = scaled_lr(cfg, runtime, cfg.gate.lr, cfg.gate.lr_base_batch)
    optimizer = build_optimizer(model.gate.width_head, cfg.gate.opt, lr, cfg.gate.weight_decay, cfg.train.momentum,
                                cfg.train.nesterov)
    scheduler = build_scheduler(optimizer, cfg.train.sched, cfg.gate.epochs, updates_per_epoch(data.train, cfg),
                                cfg.gate.warmup_epochs, cfg.train.warmup_lr, cfg.train.min_lr)
    autocast, scaler = autocast_factory(cfg.train.amp, runtime.device)
    step = build_sgs_step(cfg, model, size, runtime.device, autocast)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.gate.ema_decay) if cfg.gate.ema_decay is not None else None

    def evaluate(epoch: int) -> dict:
        net = ema.module if cfg.train.eval_ema else model
        report = evaluate_static(net, data.val, runtime.device, size, autocast)
        report.update(evaluate_gated(net, data.val, runtime.device, size, cfg.gate.rule, autocast,
                                     measure=cfg.gate.cascade_measure))
        return {"eval": report, "top1_dynamic": report["dynamic"]["top1"],
                "madds_dynamic": report["dynamic"]["madds_mean"]}

    loop = Loop(cfg, runtime, "gate", model, model, optimizer, scheduler, step, evaluate, data.train,
                cfg.gate.epochs + cfg.train.cooldown_epochs, run_dir, ema=ema, scaler=scaler, train_mode=False,
                extra_state={"classes": data.classes, "supernet": str(supernet),
                             "bn_recalibrated": bn_recalibrated(state)})
    if cfg.train.resume:
        loop.resume(cfg.train.resume)
    elif not bn_recalibrated(state):
        _recalibrate_supernet(cfg, loop, data.calib, supernet, autocast)
    if runtime.is_main:
        save_config(cfg, run_dir / "config.yaml")
    loop.run()
    if loop.epoch == loop.epochs:
        _deploy(cfg, loop, ema.module if cfg.train.eval_ema else model, data, runtime, size, autocast, evaluate)
    if runtime.is_main and "eval" in loop.last_metrics:
        write_eval(run_dir / "eval.json", {**loop.last_metrics["eval"], "data": data_signature(cfg, data.classes)})
        print(format_report(loop.last_metrics["eval"]))
    return run_dir


def _deploy(cfg: Config, loop: Loop, model: nn.Module, data: Data, runtime: Runtime, size: tuple, autocast,
            evaluate) -> None:
    """Choose the deployment policy for ``model`` (the live gate, or its EMA with
    ``train.eval_ema``) on the held-back images (or the gate as trained when ``gate.holdout`` is
    0), apply it to the live model and the EMA, evaluate it and save it in ``last.pth``."""
    from dsnet.policy import Policy, collect_outcomes, select_policy

    if data.holdout is None:
        record = {"policy": Policy().to_dict(), "reason": "gate.holdout is 0: the gate ships as trained"}
    else:
        outcomes = collect_outcomes(model, data.holdout, runtime.device, size, autocast)
        record = select_policy(outcomes, cfg.gate.deploy, cfg.gate.target_madds, cfg.gate.fallback_z,
                               measure=cfg.gate.cascade_measure)
    for net in [loop.model] + ([loop.ema.module] if loop.ema is not None else []):
        net.set_policy(Policy.from_dict(record["policy"]))
    metrics = evaluate(loop.epoch)
    metrics["eval"]["selection"] = record
    loop.extra_state["deploy"] = record
    loop.last_metrics = {**loop.last_metrics, **metrics}
    loop.log({"stage": "gate", "epoch": loop.epoch, "deploy": record, **{k: v for k, v in metrics.items() if k != "eval"}})
    loop.save(False)


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
    import json

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
