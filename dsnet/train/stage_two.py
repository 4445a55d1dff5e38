"""Stage two's parts around its SGS step: the frozen supernet with the width head it trains, the
checks of a ``--supernet`` checkpoint against the config and the data, BN recalibration of a
supernet saved before it, and the deployment policy chosen once training ends.

``train_gate(cfg, supernet)``, what ``dsnet train-gate`` and ``train_gate.py`` call, puts them into
the stage skeleton (``dsnet.train.runs.run_stage``).
"""
from __future__ import annotations

import contextlib
import copy
import logging
from pathlib import Path
from typing import Any, Callable

import timm
import torch
from torch import nn

from dsnet.config import Config, replace
from dsnet.errors import UserError
from dsnet.models.policy import Policy
from dsnet.train import sgs
from dsnet.train.checkpoint import build_model as rebuild
from dsnet.train.checkpoint import read_checkpoint
from dsnet.train.engine import Evaluation, Loop
from dsnet.train.evaluate import evaluate_gated, evaluate_static
from dsnet.train.metrics import Progress
from dsnet.train.policy_select import collect_outcomes, escalation_cost, reachable_madds, select_policy, target_kind
from dsnet.train.recalibrate import recalibrate_run
from dsnet.train.runs import (Data, build_optimizer, build_scheduler, input_shape, open_stage, optimizer_kwargs,
                              resolve_resume, run_stage, scheduler_kwargs, updates_per_epoch)

__all__ = ["train_gate", "gate_output", "check_supernet", "check_target_madds", "bn_recalibrated", "recalibrate_supernet", "gate_model",
           "head_kwargs", "build_sgs_step", "deploy"]

logger = logging.getLogger(__name__)


def gate_output(cfg: Config, supernet_path: Path) -> Config:
    """Stage two writes beside stage one: ``<output.dir>/gate`` when output.dir is the supernet's run."""
    out = Path(cfg.output.dir).resolve()
    if out == supernet_path.resolve().parent.parent:
        return replace(cfg, **{"output.dir": str(Path(cfg.output.dir) / "gate")})
    return cfg


def check_supernet(cfg: Config, state: dict, path: Path, classes: list[str]) -> None:
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


def check_target_madds(cfg: Config, model: nn.Module, size: tuple[int, int, int]) -> None:
    """Refuse, before any work, a ``gate.target_madds`` (``--target-madds``) that the policy chosen
    after training cannot reach on ``model``'s routing space at input ``size``, or that no held-back
    images would choose (``gate.holdout=0``)."""
    target = cfg.gate.target_madds
    if target is None:
        return
    if cfg.gate.holdout == 0:
        raise UserError(f"gate.target_madds (--target-madds) {target / 1e6:.2f} M is chosen on the held-back "
                         "training images, but gate.holdout is 0; set gate.holdout (e.g. 0.1) or drop the target")
    kind = target_kind(cfg.gate.deploy)
    low, high = reachable_madds(model.dynamic_costs(size), escalation_cost(model, size), kind)
    if not low <= target <= high:
        raise UserError(f"gate.target_madds (--target-madds) {target / 1e6:.2f} M is outside what the {kind} of this "
                         f"supernet can reach at {size[1]}x{size[2]} px over gate.routing_space "
                         f"{list(model.routing_space)}: {low / 1e6:.2f} M to {high / 1e6:.2f} M MAdds")


def bn_recalibrated(state: dict) -> bool:
    """Whether a stage-one checkpoint holds recalibrated BN statistics (``bn_recalibrated``; older
    checkpoints tell it by the ``recalibrated`` mark of their last metrics)."""
    return bool(state.get("bn_recalibrated", (state.get("metrics") or {}).get("recalibrated", False)))


def recalibrate_supernet(cfg: Config, loop: Loop, data: Data, supernet: Path, autocast: Any) -> None:
    """Recalibrate the BN statistics of a supernet saved before recalibration (a ``best.pth`` of
    an earlier epoch, a run with ``train.recalibrate_bn=false``) before its gate trains on them;
    with ``train.recalibrate_bn=false`` keep them and warn."""
    if not cfg.train.recalibrate_bn:
        logger.warning("--supernet %s holds BN statistics from before recalibration (train.recalibrate_bn=false)",
                       supernet)
        return
    logger.info("--supernet %s was saved before BN recalibration: recalibrating it first", supernet)
    recalibrate_run(loop.model, data, loop.runtime, cfg.train.recalibrate_batches, autocast,
                    cfg.train.recalibrate_momentum)
    loop.sync_buffers()
    if loop.ema is not None:  # the EMA starts from the recalibrated supernet
        loop.ema.set(loop.model)
    loop.extra_state["bn_recalibrated"] = True


def head_kwargs(cfg: Config) -> dict:
    """Model kwargs that rebuild stage two's width head (none for the published ``fc`` head)."""
    g = cfg.gate
    return {} if g.head == "fc" else {"gate_head": g.head, "gate_hidden": g.head_hidden, "gate_dropout": g.head_dropout}


def gate_model(cfg: Config, state: dict) -> nn.Module:
    """The frozen supernet of ``state`` with the routing space and width head stage two trains."""
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


def build_sgs_step(cfg: Config, model: nn.Module, size: tuple[int, int, int], device: torch.device | str,
                   autocast: Any = contextlib.nullcontext,
                   sampler: Callable[[torch.Tensor], torch.Tensor] | None = None) -> sgs.SGSStep:
    """Stage two's SGS step for the frozen ``model`` as ``cfg.gate`` sets it (``sgs_kwargs``), the
    routes priced at input ``size`` (C, H, W) in ``gate.cost_unit``: GMAdds, or a fraction of the
    widest route's. ``sampler``: the route sample of the task and complexity terms (``SGSStep``;
    None: Gumbel)."""
    costs = torch.tensor(model.dynamic_costs(size), dtype=torch.float32, device=device)
    costs = costs / (1e9 if cfg.gate.cost_unit == "gmadds" else costs[-1])
    return sgs.SGSStep(model, costs, autocast=autocast, sampler=sampler, **sgs.sgs_kwargs(cfg.gate))


def deploy(cfg: Config, loop: Loop, model: nn.Module, data: Data, size: tuple, autocast: Any,
           evaluate: Callable[[int], Evaluation]) -> None:
    """Choose the deployment policy for ``model`` (the live gate, or its EMA with
    ``train.eval_ema``) on the held-back images (or the gate as trained when ``gate.holdout`` is
    0), apply it to the live model and the EMA, evaluate it and save it in ``last.pth``."""
    if data.holdout is None:
        record = {"policy": Policy().to_dict(), "reason": "gate.holdout is 0: the gate ships as trained"}
    else:
        outcomes = collect_outcomes(model, data.holdout, loop.runtime.device, size, autocast)
        record = select_policy(outcomes, cfg.gate.deploy, cfg.gate.target_madds, cfg.gate.fallback_z,
                               measure=cfg.gate.cascade_measure)
    for net in [loop.model] + ([loop.ema.module] if loop.ema is not None else []):
        net.set_policy(Policy.from_dict(record["policy"]))
    result = evaluate(loop.epoch)
    result.report["selection"] = record
    loop.extra_state["deploy"] = record
    loop.take_evaluation(result)
    loop.log({"stage": "gate", "epoch": loop.epoch, "deploy": record,
              **{k: v for k, v in result.record().items() if k != "eval"}})
    loop.save(False)


def train_gate(cfg: Config, supernet: str | Path) -> Path:
    """Stage two: train the gate's width head with SGS on a frozen supernet, then choose the
    deployment policy on the held-back training images (``dsnet.train.policy_select``); returns the run dir."""
    supernet = Path(supernet)
    state = read_checkpoint(supernet, "supernet")
    cfg = gate_output(cfg, supernet)
    model = gate_model(cfg, state)
    check_target_madds(cfg, model, input_shape(cfg, model))
    if cfg.train.eval_ema and cfg.gate.ema_decay is None:
        raise UserError("train.eval_ema=true needs an EMA of the gate in stage two: "
                         "set gate.ema_decay (release: 0.997)")
    cfg = resolve_resume(cfg)
    setup = open_stage(cfg, cfg.gate.holdout)
    data, runtime, autocast = setup.data, setup.runtime, setup.autocast
    check_supernet(cfg, state, supernet, data.classes)
    model = model.to(runtime.device)
    size = input_shape(cfg, model)
    optimizer = build_optimizer(model.gate.width_head, **optimizer_kwargs(cfg, runtime, "gate"))
    scheduler = build_scheduler(optimizer, updates_per_epoch=updates_per_epoch(data.train, cfg),
                                **scheduler_kwargs(cfg, "gate"))
    step = build_sgs_step(cfg, model, size, runtime.device, autocast)
    ema = timm.utils.ModelEmaV3(model, decay=cfg.gate.ema_decay) if cfg.gate.ema_decay is not None else None
    shipped = ema.module if cfg.train.eval_ema else model

    static: dict = {}  # the frozen supernet's static subnets score the same every epoch: evaluated once

    def val() -> Progress:  # the validation loader with a progress bar (the main rank's, train.progress)
        return Progress(data.val, "evaluate", cfg.train.progress and runtime.is_main)

    def evaluate(epoch: int) -> Evaluation:
        if not static:
            static.update(evaluate_static(shipped, val(), runtime.device, size, autocast))
        report = copy.deepcopy(static)
        report.update(evaluate_gated(shipped, val(), runtime.device, size, cfg.gate.rule, autocast,
                                     measure=cfg.gate.cascade_measure))
        return Evaluation(report, {"top1_dynamic": report["dynamic"]["top1"],
                                   "madds_dynamic": report["dynamic"]["madds_mean"]})  # no best.pth: see Evaluation

    def start(loop: Loop, resumed: dict | None) -> None:
        if resumed is None and not bn_recalibrated(state):
            recalibrate_supernet(cfg, loop, data, supernet, autocast)

    def finish(loop: Loop) -> None:
        if loop.epoch == loop.epochs:
            deploy(cfg, loop, shipped, data, size, autocast, evaluate)

    return run_stage(
        cfg, setup, stage="gate", model=model, train_model=model, optimizer=optimizer, scheduler=scheduler, step=step,
        evaluate=evaluate, epochs=cfg.gate.epochs + cfg.train.cooldown_epochs, ema=ema, train_mode=False,
        eval_interval=cfg.gate.eval_interval or cfg.gate.epochs + cfg.train.cooldown_epochs,
        extra_state={"classes": data.classes, "supernet": str(supernet), "bn_recalibrated": bn_recalibrated(state)},
        start=start, finish=finish)
