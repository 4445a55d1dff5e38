"""Stage two: train the gate's width head with Sandwich Gate Sparsification (SGS).

The supernet is frozen (BN in eval mode). Per batch, the routes of the routing space run on the
batch without autograd; the slimmest route's predictions label each sample online:

- rule ``slimmest`` (the published rule): slimmest correct -> "easy" -> target the slimmest
  choice; otherwise target the widest choice of the routing space;
- rule ``slimmest_largest``: as above, but a sample that even the widest route of the routing
  space gets wrong also targets the slimmest (width cannot save it, so do not pay for it);
- rule ``cheapest``: the slimmest route of the routing space that classifies the sample
  correctly, the slimmest when none does. Every choice can be a target, not only the two ends:
  the two-ended rules teach the gate to mix the slimmest and the widest route, whose chord lies
  under a concave accuracy-MAdds curve, so a gate trained on them must be very sure to pay off.

Loss = ``sgs_weight`` x CE(gate logits, targets) + ``task_weight`` x CE(ST-Gumbel mix of the
routes' logits, labels) + ``complexity_weight`` x (mean cost of the sampled routes - target)^2
(0 below the target), a route's cost being its MAdds as a fraction of the widest route's (the
release uses GMAdds, which ties the weight to the model's size). A weight of 0 turns a term off. The task and complexity terms are the
released recipe's answer to SGS alone driving gates to the first or last choice. Because the
supernet is frozen, the routes' logits are constants: the gradients reach the width head only
through the gate's logits, so nothing is back-propagated through the network.

``balance`` (dsnet's default, off in the release) weights the SGS cross-entropy by inverse target
frequency within the batch. Easy samples usually dominate; unweighted, a gate that cannot be sure
a sample is hard learns to send everything to the slimmest route (docs/results.md shows it on the
quick start). Balanced, the argmax routes wide whenever a sample is more likely hard than the
batch's base rate.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from dsnet.config import RULES, GateConfig
from dsnet.models.net import DSNet

__all__ = ["RULES", "sgs_targets", "soft_sgs_targets", "balanced_weights", "route_targets", "frozen_forward", "complexity_penalty", "SGSStep",
           "sgs_kwargs"]



def sgs_targets(correct: Tensor, rule: str) -> Tensor:
    """Routing-space index per sample under ``rule`` (see the module docstring).

    correct: [R, B] bool, whether each route of the routing space (slimmest first) classifies
    each sample correctly. Returns [B] long.
    """
    if rule not in RULES:
        raise ValueError(f"gate.rule must be one of {', '.join(RULES)}, got {rule!r}")
    if rule == "cheapest":
        return torch.where(correct.any(0), correct.int().argmax(0), 0).long()
    easy = correct[0] | ~correct[-1] if rule == "slimmest_largest" else correct[0]
    return torch.where(easy, 0, correct.shape[0] - 1).long()


def soft_sgs_targets(p_true: Tensor, rule: str) -> Tensor:
    """Soft SGS targets [B, R]: the probability that ``rule`` picks each route when route r is
    right with probability ``p_true[r]`` (its softmax probability of the label), independently.
    With 0/1 probabilities this is the one-hot of ``sgs_targets``. p_true: [R, B]."""
    if rule not in RULES:
        raise ValueError(f"gate.rule must be one of {', '.join(RULES)}, got {rule!r}")
    num_routes, p = p_true.shape[0], p_true.float()
    q = torch.zeros_like(p)
    if rule == "cheapest":
        all_wrong_before = torch.cumprod(torch.cat([torch.ones_like(p[:1]), 1 - p[:-1]]), 0)
        q = p * all_wrong_before
        q[0] += all_wrong_before[-1] * (1 - p[-1])  # nobody right: the slimmest
        return q.T
    easy = p[0] + (1 - p[0]) * (1 - p[-1]) if rule == "slimmest_largest" else p[0]
    q[0] += easy
    q[num_routes - 1] += 1 - easy
    return q.T


def balanced_weights(targets: Tensor, num_routes: int) -> Tensor:
    """Per-choice CE weights [R] that give every target choice present in the batch equal total
    weight (inverse frequency); absent choices get weight 0. targets: [B] long, or [B, R]
    probabilities (soft targets, counted by their mass)."""
    if targets.dim() == 2:
        counts = targets.sum(0).float()
    else:
        counts = torch.bincount(targets, minlength=num_routes).float()
    present = (counts > 1e-6).float()
    return present / counts.clamp_min(1e-6) * (targets.shape[0] / present.sum().clamp_min(1.0))


def complexity_penalty(route_weights: Tensor, route_costs: Tensor, target: float) -> Tensor:
    """(mean cost - target)^2 if above target, else 0. route_weights: [B, R] (one-hot or
    probabilities); route_costs: [R] cost per route."""
    mean = (route_weights @ route_costs).mean()
    return torch.clamp(mean - target, min=0.0) ** 2


@torch.no_grad()
def frozen_forward(model: DSNet, x: Tensor, autocast: Callable[[], contextlib.AbstractContextManager]
                   = contextlib.nullcontext) -> tuple[Tensor, Tensor]:
    """Gate hidden features [B, hidden] and every routing-space route's logits [R, B, K], no autograd."""
    with autocast():
        attended, hidden = model.gate_features(x)
        logits = torch.stack([model.forward_from_gate(attended, r).float() for r in model.routes.dynamic_routes])
    return hidden.float(), logits


def route_targets(route_logits: Tensor, y: Tensor, rule: str, soft: bool = False) -> Tensor:
    """SGS targets from every route's logits [R, B, K] and labels [B]: [B] long, or with
    ``soft`` [B, R] probabilities (``soft_sgs_targets``)."""
    if soft:
        p_true = torch.softmax(route_logits.float(), 2).gather(2, y.expand(route_logits.shape[0], -1)[..., None])
        return soft_sgs_targets(p_true.squeeze(2), rule)
    return sgs_targets(route_logits.argmax(2) == y, rule)


def sgs_kwargs(gate: GateConfig) -> dict:
    """``SGSStep``'s loss settings from the config's ``gate`` section."""
    return {"rule": gate.rule, "sgs_weight": gate.sgs_weight, "task_weight": gate.task_weight,
            "complexity_weight": gate.complexity_weight, "complexity_target": gate.complexity_target,
            "gumbel_tau": gate.gumbel_tau, "balance": gate.balance, "soft_targets": gate.soft_targets,
            "label_smoothing": gate.label_smoothing}


class SGSStep:
    """One stage-two step on a frozen supernet; only ``model.gate.width_head`` gets gradients.
    The loss settings are keyword arguments named as the ``gate`` section's keys (``sgs_kwargs``)."""

    def __init__(self, model: DSNet, route_costs: Tensor, *, rule: str, sgs_weight: float, task_weight: float,
                 complexity_weight: float, complexity_target: float, gumbel_tau: float,
                 balance: bool = False, soft_targets: bool = False, label_smoothing: float = 0.0,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 sampler: Callable[[Tensor], Tensor] | None = None) -> None:
        """``route_costs``: [R] cost of each routing-space route. ``sampler`` maps the gate's
        logits [B, R] to the straight-through one-hot route sample [B, R] of the task and
        complexity terms; None is ``F.gumbel_softmax(hard=True)`` at ``gumbel_tau`` (a fixed
        sampler replays a recorded step)."""
        self.model, self.rule, self.tau, self.autocast, self.balance = model, rule, gumbel_tau, autocast, balance
        self.sampler = sampler
        self.soft_targets = soft_targets
        self.label_smoothing = label_smoothing  # on both cross-entropies, as the release
        self.weights = {"sgs": sgs_weight, "task": task_weight, "complexity": complexity_weight}
        self.complexity_target, self.route_costs = complexity_target, route_costs

    def frozen_forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return frozen_forward(self.model, x, self.autocast)

    def targets(self, route_logits: Tensor, y: Tensor) -> Tensor:
        return route_targets(route_logits, y, self.rule, self.soft_targets)

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator, backward: Callable[[Tensor], None]) -> dict:
        hidden, route_logits = self.frozen_forward(x)
        head = self.model.gate.width_head.train()  # the supernet stays in eval mode; a head's dropout trains
        gate_logits = head(hidden)
        losses: dict[str, Tensor] = {}
        total = gate_logits.new_zeros(())
        if self.weights["sgs"] > 0:
            targets = self.targets(route_logits, y)
            weight = balanced_weights(targets, gate_logits.shape[1]) if self.balance else None
            losses["sgs"] = F.cross_entropy(gate_logits, targets, weight=weight, label_smoothing=self.label_smoothing)
            total = total + self.weights["sgs"] * losses["sgs"]
        if self.weights["task"] > 0 or self.weights["complexity"] > 0:
            sample = (F.gumbel_softmax(gate_logits, tau=self.tau, hard=True) if self.sampler is None
                      else self.sampler(gate_logits))  # [B, R], straight-through
            if self.weights["task"] > 0:
                mixed = torch.einsum("br,rbk->bk", sample, route_logits)
                losses["task"] = F.cross_entropy(mixed, y, label_smoothing=self.label_smoothing)
                total = total + self.weights["task"] * losses["task"]
            if self.weights["complexity"] > 0:
                losses["complexity"] = complexity_penalty(sample, self.route_costs, self.complexity_target)
                total = total + self.weights["complexity"] * losses["complexity"]
        backward(total)
        if dist.is_available() and dist.is_initialized():  # the head is tiny: average its grads by hand
            for p in self.model.gate.width_head.parameters():
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()
        return {"loss": total.detach(), "losses": {k: v.detach() for k, v in losses.items()}}
