"""Static baselines of "Rethinking the Value of Network Pruning" (Liu et al., ICLR 2019).

``python train_supernet.py -c CONFIG --static-subnet I --budget scratch-e|scratch-b`` trains static
subnet ``I`` of the config's supernet (or ``largest``) as a plain model from scratch, with the data,
augmentation, optimizer, schedule and evaluation of stage one:

- **Scratch-E**: as many optimizer steps as the supernet run (``train.epochs`` epochs).
- **Scratch-B** (Liu et al.'s rule, their ``main_B.py``): the large model's training MAdds spent
  on the small one, ``round(steps_E x M_largest / M_I)`` steps; ``--budget-cap-epochs N`` caps
  them at ``N`` epochs, as Liu et al.'s ImageNet scripts cap theirs (at twice the epochs).
- **Scratch-B-supernet**: the supernet run's training MAdds spent on the small model. Per image, one
  stage-one step costs ``C_super = 3 (M_largest + n M_random + M_slimmest) + M_teacher`` and one
  plain step of subnet I costs ``C_I = 3 M_I`` (a backward pass ~ two forwards; ``n`` =
  ``ieb.num_random``, ``M_random`` = mean MAdds of the subnets random routes are drawn from,
  ``M_teacher`` = the EMA forwards: ``M_largest + n M_random`` for the ensemble teacher,
  ``M_largest`` for ``ema``, 0 otherwise). Scratch-B runs ``round(steps_E x C_super / C_I)`` steps,
  the epochs scaled by that MAdds ratio; the cosine schedule spans them all. It answers another
  question than Scratch-B: is one supernet cheaper to train than the subnet alone?

``--prune l1|thinet|regression --static-subnet I`` is the classic pipeline: the largest route
trained normally (the Scratch-E run of ``largest``, trained first if ``--prune-from`` is not
given and ``<output.dir>/scratch-e-largest`` holds no finished run), pruned to subnet I's shape
(L1 norm: ``dsnet.prune.channels``; ThiNet or regression-based reconstruction on ``train.recalibrate_batches``
calibration batches: ``dsnet.prune.reconstruct``), then fine-tuned at a constant learning rate.
``--prune weight --sparsity S --static-subnet largest`` zeroes the fraction S of the largest
route's conv and linear weights of smallest magnitude and fine-tunes with the zeros held
(``dsnet.prune.sparse``); it writes ``weight<S>-largest``. ``--sparsity S --static-subnet largest``
with a budget and no ``--prune`` is Liu et al.'s weight-level scratch baseline: the same zeros
(the magnitude masks of the trained largest route), freshly initialised weights, trained for the
budget with the zeros held; Scratch-B prices the model at its sparse MAdds; it writes
``<budget>-weight<S>-largest``. Fine-tuning lasts ``--finetune-epochs``
(default ``train.epochs / 4``) at ``--finetune-lr`` (default ``train.lr / 100``): Liu et al.
fine-tune 40 epochs at 0.001 after 160 at 0.1.

``--prune slimming|sss`` and ``--static-arch FILE`` (architectures found by pruning, trained
from scratch) are described in ``dsnet.prune.found``.

``--prune inherited`` with ``--static-subnet I`` or ``--static-arch FILE`` (e.g. a ``dsnet search``
result) prunes nothing: it fine-tunes the trained supernet's own weights, the plain model of subnet
I or of that architecture holding the supernet's leading channels, its BN statistics re-estimated on
``train.recalibrate_batches`` calibration batches as the search re-estimates them (``reset_bn``).
``--prune-from`` gives the supernet, a stage-one or stage-two checkpoint of the config's model
(default ``<output.dir>/checkpoints/last.pth``, the run the baselines sit beside); the run is
``inherited-subnet<I>`` or ``inherited-<label>`` (the architecture's label, as its scratch runs'),
the fine-tuned column beside the inherited weights and Scratch-E/B in ``dsnet compare``.

Each run lives in ``<output.dir>/<method>-<subnet>`` (``scratch-b-subnet0``, ``l1-subnet2``,
``scratch-e-largest``; ``dsnet.prune.baseline_spec`` names them and checks the options, ``dsnet.prune.budgets``
counts the steps), so baselines sit beside the supernet run that shares their config; its
checkpoints are stage ``static`` and its ``eval.json`` has one row plus a ``baseline`` record.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from dsnet import data as dsdata
from dsnet.config import Config, replace
from dsnet.errors import UserError
from dsnet.models.net import DenseNet, DSNet
from dsnet.prune import found
from dsnet.prune.arch import Architecture, arch_cost, build_plain, check_architecture, fresh_plain, save_architecture
from dsnet.prune.baseline_spec import INHERITED, BaselineSpec, baseline_spec, check_subnet, run_name
from dsnet.prune.budgets import Subnet, budget_steps, finetune_epochs_default
from dsnet.prune.channels import implant, l1_prune
from dsnet.prune.reconstruct import reconstruct_prune
from dsnet.prune.search import reset_bn
from dsnet.prune.sparse import apply_masks, keep_masks, magnitude_masks, sparse_madds
from dsnet.prune.static import baseline_report, load_static, plain_subnet, static_cost, tag_plain
from dsnet.train.checkpoint import build_model as rebuild
from dsnet.train.checkpoint import read_checkpoint, same_supernet
from dsnet.train.engine import Evaluation, Loop
from dsnet.train.evaluate import evaluate_plain
from dsnet.train.runs import (Setup, build_criterion, build_model, build_optimizer, build_scheduler, input_shape,
                              open_stage, optimizer_kwargs, resolve_resume, run_stage, scheduler_kwargs, to_channels_last,
                              updates_per_epoch, wrap_ddp)

__all__ = ["StaticStep", "train_static"]

logger = logging.getLogger(__name__)


class StaticStep:
    """One plain training step: cross-entropy of the model's logits (labels or mixup targets)."""

    def __init__(self, model: nn.Module, criterion, autocast) -> None:
        self.model, self.criterion, self.autocast = model, criterion, autocast

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator, backward) -> dict:
        with self.autocast():
            logits = self.model(x)
        loss = self.criterion(logits.float(), y)  # loss math in fp32 whatever the autocast dtype
        backward(loss)
        return {"loss": loss.detach(), "losses": {"ce": loss.detach()}}


def _prune_source(cfg: Config, base: Path, path: str | None, spec: "BaselineSpec") -> tuple[dict, Path]:
    """(state, path) of the finished run of the largest route that pruning starts from: its
    Scratch-E run, or for slimming and SSS its penalty-trained run (``dsnet.prune.found``); for
    ``inherited``, the trained supernet."""
    if spec.prune == INHERITED:
        return _supernet_source(cfg, base, path)
    kind = spec.prune if spec.prune in found.FINDERS else None
    name = found.train_run_name(kind, spec.penalty) if kind else run_name("scratch-e", "largest")
    default = base / name / "checkpoints" / "last.pth"
    if path is None and not default.exists():
        logger.info("no trained largest route at %s: training it first (%s)", default,
                    f"Scratch-E with {kind}'s penalty" if kind else "Scratch-E")
        train_static(cfg, "largest", "scratch-e", penalty_training=(kind, spec.penalty) if kind else None)
    path = Path(path or default)
    state = read_checkpoint(path, "static")
    if state.get("subnet") != "largest" or state["model_name"] != cfg.model.name:
        raise UserError(f"--prune-from {path} holds subnet {state.get('subnet')} of {state['model_name']}; "
                         f"pruning starts from the largest route of {cfg.model.name}")
    if state["step"] < state.get("total_steps", 0):
        raise UserError(f"--prune-from {path} stopped at step {state['step']} of {state['total_steps']}; "
                         f"finish it first with train.resume={path}")
    trained = (state.get("baseline") or {}).get("method")
    if kind and trained != f"{kind}-train":
        raise UserError(f"--prune-from {path} was not trained with {kind}'s penalty (it is a {trained} run); "
                         f"--prune {kind} starts from a {found.train_run_name(kind, spec.penalty)} run")
    return state, path


def _supernet_source(cfg: Config, base: Path, path: str | None) -> tuple[dict, Path]:
    """(state, path) of the trained supernet ``--prune inherited`` takes its weights from: a
    stage-one or stage-two checkpoint of the config's model, by default the run beside the baselines."""
    default = base / "checkpoints" / "last.pth"
    if path is None and not default.exists():
        raise UserError(f"--prune inherited fine-tunes the supernet trained in {base}, but {default} does not "
                         f"exist: train it first or give its checkpoint with --prune-from")
    path = Path(path or default)
    state = read_checkpoint(path)
    supernet = build_model(cfg, cfg.model.num_classes or 2)
    if state.get("stage") not in ("supernet", "gate") or not same_supernet(supernet, state):
        raise UserError(f"--prune-from {path} is a '{state.get('stage')}' checkpoint of {state.get('model_name')}"
                         f"({state.get('model_kwargs')}); --prune inherited starts from a stage-one or stage-two "
                         f"('supernet' or 'gate') checkpoint of {supernet.model_name}({dict(supernet.model_kwargs)})")
    return state, path


def _pruned(spec: BaselineSpec, supernet: DSNet, state: dict, cfg: Config, setup: Setup,
            size) -> tuple[nn.Module, dict, dict | None, Architecture | None]:
    """(the pruned plain model, what its baseline record adds, the weight masks fine-tuning keeps
    or None, the architecture found or None) of ``state``'s model: the trained largest route, or
    for ``inherited`` the trained supernet."""
    device = setup.runtime.device
    if spec.prune == INHERITED:
        batches = _calibration(setup.data.calib, cfg)
        model = _inherited(rebuild(state), spec, batches, device, setup.autocast)
        record = {"calib_images": sum(len(x) for x in batches)}
        if spec.arch is not None:
            record["architecture_from"] = spec.arch_file
        return tag_plain(model, supernet), record, None, spec.arch
    large = load_static(state)[0]
    if spec.prune == "weight":
        return (*_sparse(large, large, spec.sparsity, supernet, size), None)
    if spec.prune in found.FINDERS:
        arch, model, record = found.find(spec.prune, supernet, large, spec.ratio, size)
        return tag_plain(model, supernet), {**record, "penalty": spec.penalty}, None, arch
    net = implant(supernet, large)
    if spec.prune == "l1":
        return tag_plain(l1_prune(net, spec.subnet), supernet), {}, None, None
    batches = _calibration(setup.data.calib, cfg)
    pruned = reconstruct_prune(net.to(device), spec.subnet, spec.prune, batches, cfg.train.seed)
    return tag_plain(pruned, supernet), {"calib_images": sum(len(x) for x in batches)}, None, None


def _calibration(calib, cfg: Config) -> list[Tensor]:
    """The first ``train.recalibrate_batches`` batches [B, C, H, W] of the calibration loader."""
    return [x for x, _ in itertools.islice(calib, cfg.train.recalibrate_batches)]


@torch.no_grad()
def _inherited(trained: DSNet, spec: BaselineSpec, batches: list[Tensor], device: torch.device,
               autocast: Callable[[], Any]) -> DenseNet:
    """``trained`` (the supernet) at ``spec``'s static subnet or architecture as a plain model
    holding its leading channels, on ``device``, its BN statistics zeroed and re-estimated as the
    equal-weight average over ``batches`` (training mode, no update of any weight)."""
    if spec.arch is None:
        model = trained.extract(trained.routes.resolve(spec.subnet))
    else:
        model = build_plain(trained, spec.arch)
    model = model.to(device).train()
    reset_bn(model)
    with autocast():
        for x in batches:
            model(x.to(device))
    return model


def _sparse(model: DenseNet, large: DenseNet, sparsity: float, supernet: DSNet,
            size) -> tuple[DenseNet, dict, dict]:
    """(``model`` with the zeros of ``large``'s magnitude masks at ``sparsity``, its baseline
    record, the masks training holds). ``model`` is ``large`` to fine-tune it, or a freshly
    initialised twin to train the same sparse structure from scratch."""
    masks = magnitude_masks(large, sparsity)
    apply_masks(model, masks)
    dense = supernet.route_cost(supernet.routes.largest, size).madds
    return model, {"sparsity": sparsity, "madds_sparse": sparse_madds(model, dense, size)}, masks


def train_static(cfg: Config, subnet: Subnet | None, budget: str = "scratch-e", prune: str | None = None,
                 finetune_epochs: int | None = None, finetune_lr: float | None = None,
                 prune_from: str | None = None, sparsity: float | None = None,
                 cap_epochs: int | None = None, *, ratio: float | None = None, static_arch: str | None = None,
                 slimming_sparsity: float | None = None, sss_gamma: float | None = None,
                 penalty_training: tuple[str, float] | None = None) -> Path:
    """Train one baseline (module docs and ``dsnet.prune.found``); returns its run directory.
    ``penalty_training`` (kind, penalty) trains the largest route with slimming's or SSS's
    penalty, the run ``--prune slimming|sss`` starts from."""
    finetune_epochs = finetune_epochs_default(cfg) if finetune_epochs is None else finetune_epochs
    spec = baseline_spec(subnet, budget, prune, sparsity, finetune_epochs, ratio, static_arch,
                 {"slimming": slimming_sparsity, "sss": sss_gamma}, penalty_training)
    if prune and cap_epochs is not None:
        raise UserError("--budget-cap-epochs caps a scratch-b budget; a pruned model fine-tunes for --finetune-epochs")
    base = Path(cfg.output.dir)
    _check_model(cfg, spec)  # before any training
    needs_large = prune or sparsity is not None  # the trained largest route: to prune, or for its weight masks
    start = _prune_source(cfg, base, prune_from, spec) if needs_large else None
    cfg = resolve_resume(replace(cfg, **{"output.dir": str(base / spec.name)}))
    setup = open_stage(cfg)
    supernet = build_model(cfg, len(setup.data.classes))
    plan = _plan(cfg, setup, supernet, spec, start, finetune_epochs, finetune_lr, cap_epochs)
    model = plan.model.to(setup.runtime.device)
    if cfg.train.channels_last:
        model = to_channels_last(model)
    train_model = wrap_ddp(model, setup.runtime)
    optimizer = _optimizer(model, plan, cfg, setup)
    scheduler = build_scheduler(optimizer, **{**scheduler_kwargs(cfg), **plan.schedule})
    mixup = dsdata.build_mixup(cfg.data.mixup, cfg.data.cutmix, cfg.train.label_smoothing, len(setup.data.classes))
    arch_record = plan.arch.to_dict() if plan.arch is not None else None
    cost = static_cost({"architecture": arch_record, "subnet": spec.subnet, "model": model.state_dict()}, supernet,
                       input_shape(cfg, supernet))

    def evaluate(epoch: int | None = None) -> Evaluation:
        acc = evaluate_plain(model, setup.data.val, setup.runtime.device, setup.autocast,
                             channels_last=cfg.train.channels_last)
        return Evaluation(baseline_report(spec.subnet, cost, acc), {"top1": acc["top1"]}, acc["top1"])

    def begin(loop: Loop, resumed: dict | None) -> None:
        before = (resumed or {}).get("baseline", {}).get("top1_before_finetune")
        if resumed is None and prune:
            before = evaluate().best_metric
            loop.log({"stage": "static", "epoch": 0, "pruned": True, "top1": before})
        if before is not None:
            plan.info["top1_before_finetune"] = before
        if setup.runtime.is_main and plan.arch is not None:  # the run directory exists and is this run's now
            save_architecture(plan.arch, Path(cfg.output.dir) / "architecture.json")
        if setup.runtime.is_main:
            logger.info("%s of %s: %d steps (%.2f epochs, MAdds ratio %.3f), lr %.4g", spec.name,
                        supernet.model_name, plan.steps, plan.steps / plan.per_epoch, plan.ratio, plan.lr)

    return run_stage(
        cfg, setup, stage="static", model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
        step=StaticStep(train_model, build_criterion(cfg, mixup), setup.autocast), evaluate=evaluate,
        epochs=math.ceil(plan.steps / plan.per_epoch), mixup=mixup, clip_grad=cfg.train.clip_grad,
        total_steps=plan.steps, start=begin, report={"baseline": plan.info},
        extra_state={"classes": setup.data.classes, "subnet": spec.subnet, "total_steps": plan.steps,
                     "baseline": plan.info, "architecture": arch_record})


def _optimizer(model: nn.Module, plan: "_Plan", cfg: Config, setup: Setup) -> torch.optim.Optimizer:
    """The run's optimizer, holding the plan's weight masks and its penalty's hooks."""
    optimizer = build_optimizer(model, **{**optimizer_kwargs(cfg, setup.runtime), "lr": plan.lr})
    if plan.masks is not None:
        keep_masks(model, plan.masks, optimizer)
    if plan.attach is not None:
        plan.attach(optimizer)
    return optimizer


def _check_model(cfg: Config, spec: BaselineSpec) -> None:
    """Refuse a subnet or architecture the config's supernet does not have, before any training."""
    supernet = build_model(cfg, cfg.model.num_classes or 2)
    if spec.arch is None:
        return None if spec.subnet == "arch" else check_subnet(supernet, spec.subnet)  # "arch": found later
    if spec.arch.model != supernet.model_name:
        raise UserError(f"--static-arch {spec.arch_file} is an architecture of {spec.arch.model}; the config "
                         f"trains {supernet.model_name}")
    check_architecture(spec.arch, supernet, f"--static-arch {spec.arch_file}")


@dataclass
class _Plan:
    """How a baseline trains: its model, steps and schedule (``build_scheduler`` keywords)."""

    model: nn.Module
    masks: dict | None
    steps: int
    per_epoch: int
    ratio: float        # its MAdds ratio (``budget_steps``)
    lr: float
    schedule: dict
    info: dict          # the ``baseline`` record of its checkpoints and eval.json
    arch: Architecture | None = None  # an architecture's plain model: stored with its checkpoints
    attach: Callable[[torch.optim.Optimizer], Any] | None = None  # a penalty's optimizer hooks


def _plan(cfg: Config, setup: Setup, supernet: DSNet, spec: BaselineSpec, start: tuple[dict, Path] | None,
          finetune_epochs: int, finetune_lr: float | None, cap_epochs: int | None) -> _Plan:
    """A model pruned from ``start`` (the trained largest route's (state, path)) fine-tuned at a
    constant lr for ``finetune_epochs``, or a model trained from scratch on its budget's steps:
    a static subnet, an architecture, the zeros of ``start``'s weight masks (``spec.sparsity``)
    or the largest route under a penalty."""
    data, size = setup.data, input_shape(cfg, supernet)
    per_epoch = updates_per_epoch(data.train, cfg)
    lr = optimizer_kwargs(cfg, setup.runtime)["lr"]
    info: dict[str, Any] = {"method": spec.method, "subnet": spec.subnet}
    if start is not None and list(start[0].get("classes") or data.classes) != data.classes:
        raise UserError(f"the model to prune (--prune-from {start[1]}) was trained on other classes than "
                         f"{cfg.data.root}")
    if spec.prune:
        state, path = start
        model, record, masks, arch = _pruned(spec, supernet, state, cfg, setup, size)
        info.update(record, prune_from=str(path))
        steps, ratio = finetune_epochs * per_epoch, 1.0
        lr = finetune_lr if finetune_lr is not None else lr / 100
        schedule = {"sched": "none", "epochs": steps, "updates_per_epoch": 1, "warmup_epochs": 0}
        return _Plan(model, masks, steps, per_epoch, ratio, lr, schedule, _steps_info(info, steps, per_epoch, 1.0, lr),
                     arch)
    model, masks, madds, arch, attach = _scratch_model(spec, supernet, start, size, info)
    steps, ratio = budget_steps(supernet, cfg, spec.subnet, spec.budget, per_epoch, size, cap_epochs, madds)
    if cap_epochs is not None:
        info["budget_cap_epochs"] = cap_epochs
    schedule = {"sched": cfg.train.sched, "epochs": steps, "updates_per_epoch": 1,  # stepped per update
                "warmup_epochs": round(cfg.train.warmup_epochs * per_epoch)}
    return _Plan(model, masks, steps, per_epoch, ratio, lr, schedule, _steps_info(info, steps, per_epoch, ratio, lr),
                 arch, attach)


def _steps_info(info: dict, steps: int, per_epoch: int, ratio: float, lr: float) -> dict:
    return {**info, "steps": steps, "epochs": round(steps / per_epoch, 3), "budget_ratio": round(ratio, 4), "lr": lr}


def _scratch_model(spec: BaselineSpec, supernet: DSNet, start: tuple[dict, Path] | None, size,
                   info: dict) -> tuple[DenseNet, dict | None, float | None, Architecture | None, Callable | None]:
    """(the freshly initialised model a scratch run trains, its weight masks, the MAdds its
    Scratch-B budget prices (None: the subnet's), its architecture, its penalty's optimizer
    hooks); ``info`` receives what the baseline record adds."""
    if spec.arch is not None:
        info.update(architecture_from=spec.arch_file)
        model = tag_plain(fresh_plain(supernet, spec.arch), supernet)
        return model, None, arch_cost(supernet, spec.arch, size).madds, spec.arch, None
    model = plain_subnet(supernet, spec.subnet)
    if spec.sparsity is not None:  # Liu et al.'s weight-level scratch: the pruned model's masks, fresh weights
        model, record, masks = _sparse(model, load_static(start[0])[0], spec.sparsity, supernet, size)
        info.update(record, masks_from=str(start[1]))
        return model, masks, record["madds_sparse"], None, None
    if spec.penalty_training is not None:
        info.update(penalty=spec.penalty)
        return model, None, None, None, found.penalty_training(spec.penalty_training, model, supernet, spec.penalty)
    return model, None, None, None, None
