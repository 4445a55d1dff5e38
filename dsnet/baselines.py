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
(L1 norm: ``dsnet.prune``; ThiNet or regression-based reconstruction on ``train.recalibrate_batches``
calibration batches: ``dsnet.reconstruct``), then fine-tuned at a constant learning rate.
``--prune weight --sparsity S --static-subnet largest`` zeroes the fraction S of the largest
route's conv and linear weights of smallest magnitude and fine-tunes with the zeros held
(``dsnet.sparse``); it writes ``weight<S>-largest``. ``--sparsity S --static-subnet largest``
with a budget and no ``--prune`` is Liu et al.'s weight-level scratch baseline: the same zeros
(the magnitude masks of the trained largest route), freshly initialised weights, trained for the
budget with the zeros held; Scratch-B prices the model at its sparse MAdds; it writes
``<budget>-weight<S>-largest``. Fine-tuning lasts ``--finetune-epochs``
(default ``train.epochs / 4``) at ``--finetune-lr`` (default ``train.lr / 100``): Liu et al.
fine-tune 40 epochs at 0.001 after 160 at 0.1.

Each run lives in ``<output.dir>/<method>-<subnet>`` (``scratch-b-subnet0``, ``l1-subnet2``,
``scratch-e-largest``), so baselines sit beside the supernet run that shares their config; its
checkpoints are stage ``static`` and its ``eval.json`` has one row plus a ``baseline`` record.
"""
from __future__ import annotations

import itertools
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import timm
import torch
from torch import Tensor, nn

from dsnet import data as dsdata
from dsnet.checkpoint import CheckpointError, read_checkpoint
from dsnet.config import Config, replace
from dsnet.engine import Evaluation, Loop, autocast_factory
from dsnet.errors import UserError
from dsnet.evaluate import evaluate_plain, format_report
from dsnet import found
from dsnet.arch import Architecture, arch_cost, fresh_plain, load_arch_state, load_architecture, save_architecture
from dsnet.models.net import DenseNet, DSNet, RouteCost, init_weights
from dsnet.prune import implant, l1_prune
from dsnet.reconstruct import METHODS as RECONSTRUCTIONS, reconstruct_prune
from dsnet.sparse import apply_masks, keep_masks, magnitude_masks, sparse_madds
from dsnet.runs import (Setup, build_criterion, build_model, build_optimizer, build_scheduler, build_val_loader,
                        data_signature, input_shape, open_stage, optimizer_kwargs, run_stage, scheduler_kwargs,
                        updates_per_epoch, wrap_ddp, write_eval)

__all__ = ["BUDGETS", "PRUNERS", "METHODS", "FINETUNE_FRACTION", "finetune_epochs_default", "Subnet", "sandwich_madds", "budget_steps", "run_name", "check_subnet",
           "plain_subnet", "load_static", "static_cost", "baseline_report", "StaticStep", "train_static", "evaluate_baseline"]

logger = logging.getLogger(__name__)
BUDGETS = ("scratch-e", "scratch-b", "scratch-b-supernet")
PRUNERS = ("l1", *RECONSTRUCTIONS, "weight", *found.FINDERS)
METHODS = (*BUDGETS, *PRUNERS)
FINETUNE_FRACTION = 0.25  # fine-tuning epochs per training epoch by default: Liu et al.'s 40 after 160
Subnet = int | str  # a static subnet index, "largest", or "arch" (an Architecture's plain model)


def sandwich_madds(model: DSNet, num_random: int, teacher: str, input_size) -> float:
    """Training MAdds per image of one stage-one (IEB) step: ``C_super`` in the module docs."""
    static = [model.route_cost(r, input_size).madds for r in model.routes.static_routes]
    largest = model.route_cost(model.routes.largest, input_size).madds
    pool = static[min(1, len(static) - 1):]  # what IEB draws its random routes from
    randoms = num_random * sum(pool) / len(pool)
    teacher_madds = {"ensemble": largest + randoms, "ema": largest}.get(teacher, 0)
    return 3 * (largest + randoms + static[0]) + teacher_madds


def budget_steps(model: DSNet, cfg: Config, subnet: Subnet, budget: str, steps_per_epoch: int,
                 input_size, cap_epochs: int | None = None, madds: float | None = None) -> tuple[int, float]:
    """(optimizer steps, MAdds ratio) of a Scratch-E run (ratio 1), a Scratch-B run (ratio
    M_largest / M_I) or a Scratch-B-supernet run (ratio C_super / C_I); a Scratch-B run of either
    kind stops at ``cap_epochs`` epochs when that is given. ``madds`` replaces M_I (a sparse
    model's MAdds: non-zero weights x output positions)."""
    if budget not in BUDGETS:
        raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got '{budget}'")
    if cap_epochs is not None and (budget == "scratch-e" or cap_epochs < 1):
        raise UserError(f"--budget-cap-epochs takes a positive number of epochs and caps a scratch-b or "
                         f"scratch-b-supernet budget, got {cap_epochs} with --budget {budget}")
    steps_e = cfg.train.epochs * steps_per_epoch
    if budget == "scratch-e":
        return steps_e, 1.0
    small = madds if madds is not None else model.route_cost(model.routes.resolve(subnet), input_size).madds
    if budget == "scratch-b":
        ratio = model.route_cost(model.routes.largest, input_size).madds / small
    else:
        ratio = sandwich_madds(model, cfg.ieb.num_random, cfg.ieb.teacher, input_size) / (3 * small)
    steps = max(1, round(steps_e * ratio))
    return (steps if cap_epochs is None else min(steps, cap_epochs * steps_per_epoch)), ratio


def finetune_epochs_default(cfg: Config) -> int:
    """Fine-tuning epochs when ``--finetune-epochs`` is not given: ``train.epochs / 4``, at least 1."""
    return max(1, round(cfg.train.epochs * FINETUNE_FRACTION))


def run_name(method: str, subnet: Subnet) -> str:
    return f"{method}-{'largest' if subnet == 'largest' else f'subnet{subnet}'}"


def parse_subnet(text: str | int) -> Subnet:
    """``--static-subnet`` value: an index or ``largest``."""
    if text == "largest" or isinstance(text, int):
        return text
    if not str(text).isdigit():
        raise UserError(f"--static-subnet must be a subnet index (0 = slimmest) or 'largest', got '{text}'")
    return int(text)


def check_subnet(supernet: DSNet, subnet: Subnet) -> None:
    """Refuse a ``--static-subnet`` that ``supernet`` does not have."""
    if subnet != "largest" and not 0 <= subnet < supernet.num_subnets:
        raise UserError(f"--static-subnet {subnet} is out of range: {supernet.model_name} has "
                         f"{supernet.num_subnets} static subnets (0..{supernet.num_subnets - 1}) and 'largest'")


def plain_subnet(supernet: DSNet, subnet: Subnet) -> DenseNet:
    """Static subnet ``subnet`` of ``supernet`` as a plain model, freshly initialised."""
    check_subnet(supernet, subnet)
    model = supernet.extract(supernet.routes.resolve(subnet))
    init_weights(model, model.fc)  # the init of its own shape, not slices of a wider one
    return _tag(model, supernet)


def _tag(model: DenseNet, supernet: DSNet) -> DenseNet:
    model.model_name, model.model_kwargs = supernet.model_name, dict(supernet.model_kwargs)
    return model


def load_static(state: dict) -> tuple[DenseNet, DSNet]:
    """(the plain model of a ``static`` checkpoint read with ``read_checkpoint``, in eval mode;
    the supernet it was cut from, for its costs): a static subnet, an architecture (its
    ``architecture`` record) or SSS's largest route with its branch factors."""
    if state.get("architecture") is not None:
        return load_arch_state(state)[:2]
    name, kwargs = state["model_name"], dict(state["model_kwargs"])
    try:
        supernet = timm.create_model(name, **kwargs)
    except (RuntimeError, TypeError, ValueError) as err:  # timm: unknown model; dsnet: bad kwargs
        raise CheckpointError(f"checkpoint model {name}({kwargs}) cannot be built: {err}") from None
    model = plain_subnet(supernet, state["subnet"])
    if any(k.endswith(".scale") for k in state["model"]):
        found.add_scales_for("sss", model, supernet)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint weights do not fit subnet {state['subnet']} of "
                              f"{state['model_name']}: {str(err).splitlines()[-1].strip()}") from None
    return model.eval(), supernet


def static_cost(state: dict, supernet: DSNet, size) -> RouteCost:
    """MAdds of one ``size`` (C, H, W) sample and parameters of a static checkpoint's plain model
    (SSS's branch factors are parameters; their products are not MAdds, as BN's are not)."""
    if state.get("architecture") is not None:
        return arch_cost(supernet, Architecture.from_dict(state["architecture"]), size)
    cost = supernet.route_cost(supernet.routes.resolve(state["subnet"]), size)
    return cost._replace(params=cost.params + sum(k.endswith(".scale") for k in state["model"]))


def baseline_report(subnet: Subnet, cost, acc: dict) -> dict:
    """A baseline's eval.json-shaped report: one static row (``cost`` a RouteCost, ``acc``
    ``evaluate_plain``'s result), no largest route, no dynamic model."""
    return {"static": [{"subnet": subnet, "madds": cost.madds, "params": cost.params,
                        "top1": acc["top1"], "top5": acc["top5"]}],
            "largest": None, "dynamic": None, "num_samples": acc["num_samples"]}


class StaticStep:
    """One plain training step: cross-entropy of the model's logits (labels or mixup targets)."""

    def __init__(self, model: nn.Module, criterion, autocast) -> None:
        self.model, self.criterion, self.autocast = model, criterion, autocast

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator, backward) -> dict:
        with self.autocast():
            logits = self.model(x)
        loss = self.criterion(logits, y)
        backward(loss)
        return {"loss": loss.detach(), "losses": {"ce": loss.detach()}}


def _prune_source(cfg: Config, base: Path, path: str | None, model_name: str) -> tuple[dict, Path]:
    """(state, path) of the finished Scratch-E run of the largest route that L1 pruning starts from."""
    default = base / run_name("scratch-e", "largest") / "checkpoints" / "last.pth"
    if path is None and not default.exists():
        logger.info("no trained largest route at %s: training it first (Scratch-E)", default)
        train_static(cfg, "largest", "scratch-e")
    path = Path(path or default)
    state = read_checkpoint(path, "static")
    if state.get("subnet") != "largest" or state["model_name"] != model_name:
        raise UserError(f"--prune-from {path} holds subnet {state.get('subnet')} of {state['model_name']}; "
                         f"pruning starts from the largest route of {model_name}")
    if state["step"] < state.get("total_steps", 0):
        raise UserError(f"--prune-from {path} stopped at step {state['step']} of {state['total_steps']}; "
                         f"finish it first with train.resume={path}")
    return state, path


def _method_dir(subnet: Subnet, budget: str, prune: str | None, sparsity: float | None,
                finetune_epochs: int) -> tuple[str, str]:
    """(method, run directory name) of a baseline; UserError naming a bad combination."""
    if prune is not None and prune not in PRUNERS:
        raise UserError(f"--prune must be one of {', '.join(PRUNERS)}, got '{prune}'")
    if prune == "weight" and (subnet != "largest" or sparsity is None):
        raise UserError("--prune weight keeps the largest route's shape and zeroes a fraction of its weights: "
                         "give --static-subnet largest and --sparsity S (e.g. 0.5)")
    if prune not in (None, "weight") and subnet == "largest":
        raise UserError(f"--prune {prune} needs --static-subnet I, the subnet whose width to prune to")
    if sparsity is not None and prune not in (None, "weight"):
        raise UserError("--sparsity sets the fraction of weights --prune weight zeroes; it goes with --prune weight "
                        "or, to train that sparse structure from scratch, with --budget alone")
    if sparsity is not None and subnet != "largest":
        raise UserError("--sparsity keeps the largest route's shape with a fraction of its weights zero: "
                        "give --static-subnet largest")
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise UserError(f"--sparsity must be a fraction in [0, 1) of the weights to prune, got {sparsity}")
    if finetune_epochs < 1:
        raise UserError(f"--finetune-epochs must be a positive integer, got {finetune_epochs}")
    method = prune or budget
    if method not in METHODS:
        raise UserError(f"--budget must be one of {', '.join(BUDGETS)}, got '{budget}'")
    if sparsity is None:
        return method, run_name(method, subnet)
    return method, run_name(f"weight{sparsity:g}" if prune == "weight" else f"{method}-weight{sparsity:g}", subnet)


def _pruned(method: str, supernet: DSNet, large: DenseNet, subnet: Subnet, calib, cfg: Config, sparsity,
            device: torch.device, size) -> tuple[nn.Module, dict, dict | None]:
    """(the pruned plain model, what its baseline record adds, the weight masks fine-tuning keeps
    or None) of ``large``, the trained largest route."""
    if method == "weight":
        return _sparse(large, large, sparsity, supernet, size)
    net = implant(supernet, large)
    if method == "l1":
        return _tag(l1_prune(net, subnet), supernet), {}, None
    batches = [x for x, _ in itertools.islice(calib, cfg.train.recalibrate_batches)]
    pruned = reconstruct_prune(net.to(device), subnet, method, batches, cfg.train.seed)
    return _tag(pruned, supernet), {"calib_images": sum(len(x) for x in batches)}, None


def _sparse(model: DenseNet, large: DenseNet, sparsity: float, supernet: DSNet,
            size) -> tuple[DenseNet, dict, dict]:
    """(``model`` with the zeros of ``large``'s magnitude masks at ``sparsity``, its baseline
    record, the masks training holds). ``model`` is ``large`` to fine-tune it, or a freshly
    initialised twin to train the same sparse structure from scratch."""
    masks = magnitude_masks(large, sparsity)
    apply_masks(model, masks)
    dense = supernet.route_cost(supernet.routes.largest, size).madds
    return model, {"sparsity": sparsity, "madds_sparse": sparse_madds(model, dense, size)}, masks


def train_static(cfg: Config, subnet: Subnet, budget: str = "scratch-e", prune: str | None = None,
                 finetune_epochs: int | None = None, finetune_lr: float | None = None,
                 prune_from: str | None = None, sparsity: float | None = None,
                 cap_epochs: int | None = None) -> Path:
    """Train one baseline (module docs); returns its run directory."""
    finetune_epochs = finetune_epochs_default(cfg) if finetune_epochs is None else finetune_epochs
    method, name = _method_dir(subnet, budget, prune, sparsity, finetune_epochs)
    if prune and cap_epochs is not None:
        raise UserError("--budget-cap-epochs caps a scratch-b budget; a pruned model fine-tunes for --finetune-epochs")
    base = Path(cfg.output.dir)
    check_subnet(build_model(cfg, cfg.model.num_classes or 2), subnet)  # before any training
    needs_large = prune or sparsity is not None  # the trained largest route: to prune, or for its weight masks
    start = _prune_source(cfg, base, prune_from, cfg.model.name) if needs_large else None
    cfg = replace(cfg, **{"output.dir": str(base / name)})
    setup = open_stage(cfg)
    supernet = build_model(cfg, len(setup.data.classes))
    plan = _plan(cfg, setup, supernet, method, subnet, start, prune is not None, sparsity, finetune_epochs,
                 finetune_lr, cap_epochs)
    model = plan.model.to(setup.runtime.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    train_model = wrap_ddp(model, setup.runtime)
    optimizer = build_optimizer(model, **{**optimizer_kwargs(cfg, setup.runtime), "lr": plan.lr})
    if plan.masks is not None:
        keep_masks(model, plan.masks, optimizer)
    scheduler = build_scheduler(optimizer, **{**scheduler_kwargs(cfg), **plan.schedule})
    mixup = dsdata.build_mixup(cfg.data.mixup, cfg.data.cutmix, cfg.train.label_smoothing, len(setup.data.classes))
    cost = supernet.route_cost(supernet.routes.resolve(subnet), input_shape(cfg, supernet))

    def evaluate(epoch: int | None = None) -> Evaluation:
        acc = evaluate_plain(model, setup.data.val, setup.runtime.device, setup.autocast,
                             channels_last=cfg.train.channels_last)
        return Evaluation(baseline_report(subnet, cost, acc), {"top1": acc["top1"]}, acc["top1"])

    def begin(loop: Loop, resumed: dict | None) -> None:
        before = (resumed or {}).get("baseline", {}).get("top1_before_finetune")
        if resumed is None and prune:
            before = evaluate().best_metric
            loop.log({"stage": "static", "epoch": 0, "pruned": True, "top1": before})
        if before is not None:
            plan.info["top1_before_finetune"] = before
        if setup.runtime.is_main:
            logger.info("%s of %s: %d steps (%.2f epochs, MAdds ratio %.3f), lr %.4g", name,
                        supernet.model_name, plan.steps, plan.steps / plan.per_epoch, plan.ratio, plan.lr)

    return run_stage(
        cfg, setup, stage="static", model=model, train_model=train_model, optimizer=optimizer, scheduler=scheduler,
        step=StaticStep(train_model, build_criterion(cfg, mixup), setup.autocast), evaluate=evaluate,
        epochs=math.ceil(plan.steps / plan.per_epoch), mixup=mixup, clip_grad=cfg.train.clip_grad,
        total_steps=plan.steps, start=begin, report={"baseline": plan.info},
        extra_state={"classes": setup.data.classes, "subnet": subnet, "total_steps": plan.steps,
                     "baseline": plan.info})


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


def _plan(cfg: Config, setup: Setup, supernet: DSNet, method: str, subnet: Subnet, start: tuple[dict, Path] | None,
          prune: bool, sparsity: float | None, finetune_epochs: int, finetune_lr: float | None,
          cap_epochs: int | None) -> _Plan:
    """A model pruned from ``start`` (the trained largest route's (state, path)) fine-tuned at a
    constant lr for ``finetune_epochs``, or the plain subnet trained from scratch on its budget's
    steps (with ``sparsity``: the zeros of ``start``'s weight masks, fresh weights)."""
    data, size = setup.data, input_shape(cfg, supernet)
    per_epoch = updates_per_epoch(data.train, cfg)
    lr = optimizer_kwargs(cfg, setup.runtime)["lr"]
    info: dict[str, Any] = {"method": method, "subnet": subnet}
    if start is not None and list(start[0].get("classes") or data.classes) != data.classes:
        raise UserError(f"the largest route to prune (--prune-from) was trained on other classes than {cfg.data.root}")
    if prune:
        state, path = start
        model, record, masks = _pruned(method, supernet, load_static(state)[0], subnet, data.calib, cfg,
                                       sparsity, setup.runtime.device, size)
        info.update(record)
        steps, ratio, sched, warmup = finetune_epochs * per_epoch, 1.0, "none", 0
        lr = finetune_lr if finetune_lr is not None else lr / 100
        info["prune_from"] = str(path)
    else:
        model, masks, madds = plain_subnet(supernet, subnet), None, None
        if sparsity is not None:  # Liu et al.'s weight-level scratch: the pruned model's masks, fresh weights
            model, record, masks = _sparse(model, load_static(start[0])[0], sparsity, supernet, size)
            info.update(record, masks_from=str(start[1]))
            madds = record["madds_sparse"]
        steps, ratio = budget_steps(supernet, cfg, subnet, method, per_epoch, size, cap_epochs, madds)
        sched, warmup = cfg.train.sched, round(cfg.train.warmup_epochs * per_epoch)
        if cap_epochs is not None:
            info["budget_cap_epochs"] = cap_epochs
    info.update(steps=steps, epochs=round(steps / per_epoch, 3), budget_ratio=round(ratio, 4), lr=lr)
    schedule = {"sched": sched, "epochs": steps, "updates_per_epoch": 1, "warmup_epochs": warmup}  # stepped per update
    return _Plan(model, masks, steps, per_epoch, ratio, lr, schedule, info)


def evaluate_baseline(checkpoint: str, overrides: Sequence[str] = (), data_root: str | None = None,
                      json_path: str | None = None, max_batches: int | None = None) -> None:
    """``dsnet evaluate`` of a static baseline checkpoint: its one row on the run's validation
    data (``data_root`` and ``overrides`` applied to its config); writes ``json_path`` if given."""
    from dsnet.engine import checkpoint_run
    from dsnet.evaluate import check_classes

    state = read_checkpoint(checkpoint, "static")
    cfg, runtime = checkpoint_run(state, overrides, data_root)
    loader, classes = build_val_loader(cfg, runtime)
    check_classes(state, classes)
    model, supernet = load_static(state)
    cost = static_cost(state, supernet, (supernet.in_chans, cfg.data.input_size, cfg.data.input_size))
    acc = evaluate_plain(model.to(runtime.device), loader, runtime.device,
                         autocast_factory(cfg.train.amp, runtime.device)[0], max_batches)
    report = {**baseline_report(state["subnet"], cost, acc), "baseline": state.get("baseline"),
              "data": data_signature(cfg, classes)}
    if not runtime.is_main:
        return
    print(format_report(report))
    if json_path:
        write_eval(Path(json_path), report)
