"""Greedy slimming (AutoSlim, Yu & Huang 2019): the static architecture a trained supernet holds at
a MAdds budget, in the frame of ``dsnet.prune.arch`` (a width per channel space).

The search starts from the largest route, every channel space at its widest. Each step tries every
space one choice narrower in its width list (the output choices of the conv that writes it), so
that every candidate is a combination of widths the supernet trained; a space at its slimmest
choice is not tried. Each candidate becomes a plain model holding the supernet's leading channels
(``build_plain``), its BN statistics are re-estimated on the same few training batches
(``ScoringSet.calib``: training transforms, a cumulative average, as ``dsnet recalibrate`` does),
and it is scored on training images held back from calibration (``ScoringSet.holdout``; never the
validation set). The step keeps the candidate that loses the least top-1 per MAdd saved (ties:
the lower holdout loss), and the search stops at the first architecture at or under the target.

What does not change is not run again: a candidate differs from the step's base only from the
first unit that touches its space (the unit its name points into) on, and the units before it are
the base's, with the base's statistics. ``Scorer.step`` runs the base once, unit range by unit
range in the order of the candidates' first units, keeping the activations of the calibration and
holdout images at the current unit, and runs each candidate from its first unit only. A step thus
costs one pass of the base plus, per candidate, the units from its first on.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dsnet.errors import UserError
from dsnet.layers import DSConv2d
from dsnet.models.net import DenseNet, DSNet
from dsnet.prune.arch import Architecture, arch_cost, build_plain, full_architecture, named_spaces, unit_of
from dsnet.train.logs import progress_bar

__all__ = ["ScoringSet", "Score", "Scorer", "SearchResult", "space_choices", "slimmest_architecture", "narrower",
           "check_target", "reset_bn", "greedy_search"]

logger = logging.getLogger(__name__)


# ---- the search space -----------------------------------------------------------------------------

def space_choices(supernet: DSNet) -> dict[str, tuple[int, ...]]:
    """Each channel space's width list: the output choices of the conv writing it (``named_spaces``' order)."""
    convs = {id(m.weight): m for m in supernet.modules() if isinstance(m, DSConv2d)}
    return {name: convs[id(space.writers[0])].out_choices for name, space in named_spaces(supernet).items()}


def slimmest_architecture(supernet: DSNet) -> Architecture:
    """Every channel space at the first choice of its width list: the cheapest the search reaches."""
    full = full_architecture(supernet)
    return Architecture(full.model, full.model_kwargs, {n: c[0] for n, c in space_choices(supernet).items()})


def narrower(arch: Architecture, name: str, choices: Sequence[int]) -> Architecture | None:
    """``arch`` with space ``name`` at the next choice below its width (None at the slimmest)."""
    below = [c for c in choices if c < arch.widths[name]]
    if not below:
        return None
    return Architecture(arch.model, arch.model_kwargs, {**arch.widths, name: below[-1]}, arch.removed)


def check_target(supernet: DSNet, target: float, size: Sequence[int]) -> None:
    """UserError unless ``target`` lies between the slimmest and the largest architecture's MAdds."""
    low = arch_cost(supernet, slimmest_architecture(supernet), size).madds
    high = arch_cost(supernet, full_architecture(supernet), size).madds
    if not low <= target < high:
        raise UserError(f"--target-madds {target:,.0f} is outside what {supernet.model_name} can be slimmed to at "
                        f"{size[1]}x{size[2]}: give a target from {low:,} MAdds (every channel space at its slimmest "
                        f"width) up to below {high:,} (the largest route)")


# ---- scoring --------------------------------------------------------------------------------------

@dataclass
class ScoringSet:
    """The images every candidate sees: ``calib``, training batches [B, C, H, W] (training
    transforms) its BN statistics are estimated on, the same for every candidate; ``holdout``,
    (images, labels) batches of training images held back from ``calib``, that score it."""

    calib: list[Tensor]
    holdout: list[tuple[Tensor, Tensor]]

    @property
    def num_holdout(self) -> int:
        return sum(len(y) for _, y in self.holdout)


@dataclass(frozen=True)
class Score:
    """A candidate's holdout top-1 (percent), mean cross-entropy and MAdds."""

    top1: float
    loss: float
    madds: int


def reset_bn(module: nn.Module) -> None:
    """Zero every BN's running statistics of ``module`` and make the next batches' equal-weight average them."""
    for bn in module.modules():
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            bn.reset_running_stats()
            bn.momentum = None


class Scorer:
    """Recalibrates and scores architectures of ``supernet`` on a ``ScoringSet`` (module docs)."""

    def __init__(self, supernet: DSNet, data: ScoringSet, size: Sequence[int], device: torch.device,
                 autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 channels_last: bool = False) -> None:
        self.supernet, self.data, self.size, self.device = supernet, data, tuple(size), device
        self.autocast, self.channels_last = autocast, channels_last
        self.evaluations = 0
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._calib = [x.to(device).contiguous(memory_format=fmt) for x in data.calib]
        self._held = [x.to(device).contiguous(memory_format=fmt) for x, _ in data.holdout]
        self._labels = [y.to(device) for _, y in data.holdout]

    def plain(self, arch: Architecture) -> DenseNet:
        """``arch``'s plain model on the scorer's device, statistics not yet recalibrated."""
        model = build_plain(self.supernet, arch).to(self.device)
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def first_unit(self, arch: Architecture, name: str) -> int:
        """The index into the plain model's ``features`` of the first layer touching space ``name``."""
        kept = [i for i in range(len(self.supernet.units)) if i not in arch.removed]
        return kept.index(unit_of(name))

    def full(self, arch: Architecture) -> tuple[Score, DenseNet]:
        """``arch``'s score and its recalibrated plain model (eval mode), run from the input."""
        model = self.plain(arch)
        reset_bn(model)
        _, held = self._advance(model, self._calib, self._held, 0, len(model.features))
        self.evaluations += 1
        return self._head(model, held, arch), model.eval()

    def step(self, base: Architecture, candidates: Sequence[tuple[str, Architecture]],
             tick: Callable[[], None] = lambda: None) -> tuple[Score, list[Score]]:
        """(``base``'s score, each candidate's): ``candidates`` are (the space it narrows, architecture)."""
        model = self.plain(base)
        reset_bn(model)
        starts = [self.first_unit(base, name) for name, _ in candidates]
        calib, held, at = self._calib, self._held, 0
        scores: list[Score | None] = [None] * len(candidates)
        for i in sorted(range(len(candidates)), key=starts.__getitem__):
            calib, held = self._advance(model, calib, held, at, starts[i])
            at = starts[i]
            cand = self.plain(candidates[i][1])
            reset_bn(cand.features[at:])
            scores[i] = self._head(cand, self._advance(cand, calib, held, at, len(cand.features))[1],
                                   candidates[i][1])
            self.evaluations += 1
            tick()
        held = self._advance(model, calib, held, at, len(model.features))[1]
        self.evaluations += 1
        tick()
        return self._head(model, held, base), scores

    def _advance(self, model: DenseNet, calib: list[Tensor], held: list[Tensor], start: int,
                 stop: int) -> tuple[list[Tensor], list[Tensor]]:
        """Run ``model.features[start:stop]`` on the calibration activations in train mode (which
        estimates those layers' statistics), then on the holdout activations in eval mode."""
        layers = model.features[start:stop]
        if not len(layers):
            return calib, held
        with torch.no_grad(), self.autocast():
            layers.train()
            calib = [layers(x) for x in calib]
            layers.eval()
            held = [layers(x) for x in held]
        return calib, held

    def _head(self, model: DenseNet, features: list[Tensor], arch: Architecture) -> Score:
        """The score of ``features`` (the holdout's outputs of ``model.features``) through the
        classifier, as ``DenseNet.forward`` ends: pool, dropout (eval: none), fc."""
        model.eval()
        correct = torch.zeros((), dtype=torch.long, device=self.device)
        loss = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.inference_mode(), self.autocast():
            for h, y in zip(features, self._labels):
                logits = model.fc(model.dropout(h.mean((2, 3)))).float()
                correct += logits.argmax(1).eq(y).sum()
                loss += F.cross_entropy(logits, y, reduction="sum").double()
        n = self.data.num_holdout
        return Score(int(correct) * 100.0 / n, float(loss) / n, arch_cost(self.supernet, arch, self.size).madds)


# ---- the search -----------------------------------------------------------------------------------

@dataclass
class SearchResult:
    """The architecture found, its score, and every step's record (``steps``: the base, its
    candidates and the one kept; JSON-able)."""

    arch: Architecture
    score: Score
    steps: list[dict] = field(default_factory=list)
    evaluations: int = 0


def _record(score: Score) -> dict:
    return {"madds": score.madds, "top1": score.top1, "loss": score.loss}


def _cost_of_loss(base: Score, cand: Score) -> tuple[float, float]:
    """The selection key: top-1 points lost per million MAdds saved, then the holdout loss."""
    return (base.top1 - cand.top1) / ((base.madds - cand.madds) / 1e6), cand.loss


def greedy_search(scorer: Scorer, target: float, progress: bool = False) -> SearchResult:
    """Slim ``scorer.supernet`` from its largest route to at most ``target`` MAdds (module docs)."""
    supernet = scorer.supernet
    check_target(supernet, target, scorer.size)
    choices = space_choices(supernet)
    arch, steps = full_architecture(supernet), []
    while True:
        moves = [(name, a) for name in choices if (a := narrower(arch, name, choices[name])) is not None]
        last = arch_cost(supernet, arch, scorer.size).madds <= target
        if last:
            moves, (base, cands) = [], (scorer.full(arch)[0], [])
        else:
            with progress_bar(len(moves) + 1, f"search step {len(steps)}", progress) as bar:
                base, cands = scorer.step(arch, moves, bar.update)
        record = {"step": len(steps), "widths": dict(arch.widths), **_record(base),
                  "candidates": [{"space": n, "width": a.widths[n], **_record(s),
                                  "points_per_mmadds": _cost_of_loss(base, s)[0]} for (n, a), s in zip(moves, cands)]}
        steps.append(record)
        if last:
            return SearchResult(arch, base, steps, scorer.evaluations)
        best = min(range(len(moves)), key=lambda i: _cost_of_loss(base, cands[i]))
        record["kept"] = moves[best][0]
        logger.info("search step %d: %.2fM MAdds, holdout top-1 %.2f; narrowing %s to %d -> %.2fM, top-1 %.2f",
                    record["step"], base.madds / 1e6, base.top1, moves[best][0], moves[best][1].widths[moves[best][0]],
                    cands[best].madds / 1e6, cands[best].top1)
        arch = moves[best][1]
