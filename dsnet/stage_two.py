"""Stage two's parts around its SGS step: the frozen supernet with the width head it trains, the
checks of a ``--supernet`` checkpoint against the config and the data, BN recalibration of a
supernet saved before it, and the deployment policy chosen once training ends.

``dsnet.runs.train_gate`` puts them into the stage skeleton (``dsnet.runs.run_stage``).
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import nn

from dsnet.config import Config, replace
from dsnet.engine import Evaluation, Loop
from dsnet.errors import UserError
from dsnet.recalibrate import recalibrate_bn

if TYPE_CHECKING:
    from dsnet.runs import Data
    from dsnet.sgs import SGSStep

__all__ = ["gate_output", "check_supernet", "bn_recalibrated", "recalibrate_supernet", "gate_model", "head_kwargs",
           "build_sgs_step", "deploy"]

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


def bn_recalibrated(state: dict) -> bool:
    """Whether a stage-one checkpoint holds recalibrated BN statistics (``bn_recalibrated``; older
    checkpoints tell it by the ``recalibrated`` mark of their last metrics)."""
    return bool(state.get("bn_recalibrated", (state.get("metrics") or {}).get("recalibrated", False)))


def recalibrate_supernet(cfg: Config, loop: Loop, calib: Any, supernet: Path, autocast: Any) -> None:
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


def head_kwargs(cfg: Config) -> dict:
    """Model kwargs that rebuild stage two's width head (none for the published ``fc`` head)."""
    g = cfg.gate
    return {} if g.head == "fc" else {"gate_head": g.head, "gate_hidden": g.head_hidden, "gate_dropout": g.head_dropout}


def gate_model(cfg: Config, state: dict) -> nn.Module:
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


def build_sgs_step(cfg: Config, model: nn.Module, size: tuple[int, int, int], device: torch.device | str,
                   autocast: Any = contextlib.nullcontext,
                   sampler: Callable[[torch.Tensor], torch.Tensor] | None = None) -> SGSStep:
    """Stage two's SGS step for the frozen ``model`` as ``cfg.gate`` sets it (``sgs_kwargs``), the
    routes priced at input ``size`` (C, H, W) in ``gate.cost_unit``: GMAdds, or a fraction of the
    widest route's. ``sampler``: the route sample of the task and complexity terms (``SGSStep``;
    None: Gumbel)."""
    from dsnet import sgs

    costs = torch.tensor(model.dynamic_costs(size), dtype=torch.float32, device=device)
    costs = costs / (1e9 if cfg.gate.cost_unit == "gmadds" else costs[-1])
    return sgs.SGSStep(model, costs, autocast=autocast, sampler=sampler, **sgs.sgs_kwargs(cfg.gate))


def deploy(cfg: Config, loop: Loop, model: nn.Module, data: Data, size: tuple, autocast: Any,
           evaluate: Callable[[int], Evaluation]) -> None:
    """Choose the deployment policy for ``model`` (the live gate, or its EMA with
    ``train.eval_ema``) on the held-back images (or the gate as trained when ``gate.holdout`` is
    0), apply it to the live model and the EMA, evaluate it and save it in ``last.pth``."""
    from dsnet.policy import Policy, collect_outcomes, select_policy

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
