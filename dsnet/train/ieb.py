"""Stage one: In-place Ensemble Bootstrapping (IEB), one sandwich step per batch.

Each step trains several subnets on the same batch: the largest route, ``num_random`` random
static subnets and the slimmest. Gradients accumulate over the sandwich (one backward per subnet,
so only one graph is alive at a time); the training loop then takes one optimizer step and one
EMA update. Who teaches whom is set by ``teacher``:

- ``ensemble`` (IEB, the paper's default): the largest learns from labels; random subnets from
  the EMA-largest's probabilities; the slimmest from the mean of the EMA-largest's and the EMA
  random subnets' probabilities.
- ``ema``: every subnet but the largest learns from the EMA-largest (the released config).
- ``inplace``: in-place distillation, the live largest (detached) teaches (no EMA needed).
- ``none``: every subnet learns from the labels.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.config import EMA_TEACHERS, TEACHERS
from dsnet.models.routes import Route, RouteTable

__all__ = ["TEACHERS", "soft_cross_entropy", "ensemble_probs", "sandwich_targets", "IEBStep"]



def soft_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean over the batch of -sum(target * log_softmax(logits)); logits, target: [B, K]."""
    return torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def ensemble_probs(logits: Sequence[Tensor]) -> Tensor:
    """Mean of the softmax probabilities of several [B, K] logits -> [B, K]."""
    return torch.stack([F.softmax(t.float(), dim=-1) for t in logits]).mean(0)


def sandwich_targets(teacher: str, largest: Tensor | None, randoms: Sequence[Tensor]
                     ) -> tuple[Tensor | None, Tensor | None]:
    """Soft targets (random subnets', slimmest's) from teacher logits, or None for labels.

    ``largest``: the teacher's largest-route logits [B, K] (EMA or live, detached); ``randoms``:
    the EMA logits of the random subnets (used by ``ensemble`` only).
    """
    if teacher not in TEACHERS:
        raise ValueError(f"ieb.teacher must be one of {', '.join(TEACHERS)}, got {teacher!r}")
    if teacher == "none":
        return None, None
    assert largest is not None, "a distilling teacher needs the largest route's logits"
    largest_probs = F.softmax(largest.float(), dim=-1)
    if teacher == "ensemble" and randoms:
        return largest_probs, ensemble_probs([largest, *randoms])
    return largest_probs, largest_probs


Backward = Callable[[Tensor], None]


class IEBStep:
    """One sandwich step. ``model`` may be DDP-wrapped (its earlier backwards skip the all-reduce);
    ``ema`` is the EMA module (the teacher) or None; ``criterion`` takes (logits, labels)."""

    def __init__(self, model: nn.Module, routes: RouteTable, ema: nn.Module | None, teacher: str,
                 num_random: int, criterion: Callable[[Tensor, Tensor], Tensor],
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        if teacher in EMA_TEACHERS and ema is None:
            raise ValueError(f"ieb.teacher={teacher} needs an EMA model")
        self.model, self.routes, self.ema, self.teacher = model, routes, ema, teacher
        self.num_random, self.criterion, self.autocast = num_random, criterion, autocast

    def plan(self, generator: torch.Generator) -> list[Route]:
        """The sandwich: largest, ``num_random`` random static subnets, slimmest."""
        return [self.routes.largest, *self.routes.sample(generator, self.num_random), self.routes.static(0)]

    @torch.no_grad()
    def _teacher_logits(self, x: Tensor, plan: list[Route]) -> tuple[Tensor | None, list[Tensor]]:
        if self.teacher not in EMA_TEACHERS:
            return None, []
        with self.autocast():
            largest = self.ema(x, subnet=plan[0])
            randoms = [self.ema(x, subnet=r) for r in plan[1:-1]] if self.teacher == "ensemble" else []
        return largest, randoms

    def __call__(self, x: Tensor, y: Tensor, generator: torch.Generator, backward: Backward,
                 plan: list[Route] | None = None) -> dict:
        """Forward + backward every subnet of the sandwich on batch (x [B, C, H, W], y).

        ``y`` is [B] class indices or [B, K] soft labels (mixup). ``backward(loss)`` is the
        loop's backward (loss scaling, accumulation). ``plan`` replaces the sampled sandwich
        (largest, random subnets, slimmest), e.g. to replay a step another trainer recorded.
        Returns per-subnet losses (tensors, no host sync) and the routes trained.
        """
        plan = self.plan(generator) if plan is None else plan
        ema_largest, ema_randoms = self._teacher_logits(x, plan)
        names = ["largest", *[f"random{j}" for j in range(len(plan) - 2)], "slimmest"]
        losses: dict[str, Tensor] = {}
        random_target = slim_target = None
        for i, (name, route) in enumerate(zip(names, plan)):
            last = i == len(plan) - 1
            sync = contextlib.nullcontext() if last or not hasattr(self.model, "no_sync") else self.model.no_sync()
            with sync:
                with self.autocast():
                    logits = self.model(x, subnet=route)
                if i == 0:
                    teacher = ema_largest if self.teacher != "inplace" else logits.detach()
                    random_target, slim_target = sandwich_targets(self.teacher, teacher, ema_randoms)
                target = slim_target if last else random_target
                # loss math in fp32 (soft_cross_entropy casts too): bf16 log-softmax over many classes loses digits
                loss = self.criterion(logits.float(), y) if i == 0 or target is None else soft_cross_entropy(logits, target)
                backward(loss)
            losses[name] = loss.detach()
        total = torch.stack(list(losses.values())).sum()
        return {"loss": total, "losses": losses, "routes": plan}
