"""Architectures found by pruning, as static baselines (Liu et al., ICLR 2019, section 5).

Network Slimming (``dsnet.prune.slimming``) and Sparse Structure Selection (``dsnet.prune.sss``) find an
architecture rather than fill a predefined one. ``dsnet.prune.baselines`` runs each in three steps, each
its own run directory under ``output.dir``:

1. **Penalty training** of the largest route as a plain model, for the Scratch-E budget
   (``<kind>-train<penalty>-largest``): slimming adds ``s * sum |gamma|`` over every batch norm
   (``--slimming-sparsity``, default 1e-4); SSS puts a factor on every removable residual branch
   and trains the factors by APG with sparsity ``--sss-gamma`` (default 1e-2).
2. **Pruning and fine-tuning** (``--prune slimming --ratio R`` or ``--prune sss``, with
   ``--static-subnet largest``; ``slimming<R>-largest`` / ``sss<gamma>-largest``): the found
   architecture, written to the run's ``architecture.json`` and its checkpoints, fine-tuned like
   every pruned baseline.
3. **Training it from scratch**: ``--static-arch RUN/architecture.json --budget scratch-e|scratch-b``
   (``<budget>-<name>``, the name of the run that found it); Scratch-B prices it at its own MAdds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from dsnet.errors import UserError
from dsnet.models.net import DenseNet, DSNet
from dsnet.prune import slimming, sss
from dsnet.prune.arch import Architecture, arch_cost

__all__ = ["FINDERS", "PENALTIES", "check_finder", "train_run_name", "found_run_name", "arch_label",
           "penalty_training", "find"]

FINDERS = ("slimming", "sss")
PENALTIES = {"slimming": slimming.SPARSITY, "sss": sss.SPARSITY}
_FLAGS = {"slimming": "--slimming-sparsity", "sss": "--sss-gamma"}


def check_finder(prune: str | None, subnet: Any, ratio: float | None, penalties: dict[str, float | None]) -> float | None:
    """The penalty of ``prune`` (its flag's value or the default), after refusing flags that do not
    go together; None when ``prune`` is not an architecture-finding method."""
    for kind, value in penalties.items():
        if value is not None and prune != kind:
            raise UserError(f"{_FLAGS[kind]} sets the penalty of --prune {kind}; give it with --prune {kind}")
        if value is not None and not value > 0:
            raise UserError(f"{_FLAGS[kind]} must be a positive penalty (default {PENALTIES[kind]:g}), got {value}")
    if ratio is not None and prune != "slimming":
        raise UserError("--ratio sets the fraction of channels --prune slimming removes; give it with --prune slimming")
    if prune not in FINDERS:
        return None
    if subnet != "largest":
        raise UserError(f"--prune {prune} finds its own architecture from the largest route: give --static-subnet largest")
    if prune == "slimming" and (ratio is None or not 0.0 < ratio < 1.0):
        raise UserError(f"--prune slimming needs --ratio R, the fraction of all channels to remove, in (0, 1) "
                        f"(Liu et al. use 0.4-0.7 on CIFAR), got {ratio}")
    return penalties[prune] if penalties[prune] is not None else PENALTIES[prune]


def train_run_name(kind: str, penalty: float) -> str:
    """The penalty-trained largest route's run directory: ``slimming-train0.0001-largest``."""
    return f"{kind}-train{penalty:g}-largest"


def found_run_name(kind: str, penalty: float, ratio: float | None) -> str:
    """The pruned and fine-tuned run's directory: ``slimming0.4-largest`` (with ``-s<penalty>``
    when not the default) or ``sss0.01-largest``."""
    if kind == "sss":
        return f"sss{penalty:g}-largest"
    suffix = "" if penalty == PENALTIES[kind] else f"-s{penalty:g}"
    return f"slimming{ratio:g}{suffix}-largest"


def arch_label(path: str | Path) -> str:
    """The name a ``--static-arch`` file gives its scratch runs: the directory of the run that
    wrote it (``RUN/architecture.json``), else the file's stem."""
    path = Path(path)
    return path.resolve().parent.name if path.name == "architecture.json" else path.stem


def penalty_training(kind: str, model: DenseNet, supernet: DSNet,
                     penalty: float) -> Callable[[torch.optim.Optimizer], Any]:
    """Prepare ``model`` (the freshly initialised largest route, plain) for ``kind``'s penalty
    training, in place; returns what attaches the penalty to the run's optimizer."""
    if kind == "slimming":
        return lambda optimizer: slimming.attach_bn_subgradient(optimizer, model, penalty)
    scales = sss.add_scales(model, supernet)
    return lambda optimizer: sss.attach_apg(optimizer, scales, penalty)


def find(kind: str, supernet: DSNet, large: DenseNet, ratio: float | None,
         size) -> tuple[Architecture, DenseNet, dict]:
    """(the architecture ``kind`` finds in ``large``, the penalty-trained largest route; that
    architecture as a plain model holding ``large``'s weights; what the baseline record adds)."""
    if kind == "slimming":
        arch, model = slimming.slimming_prune(supernet, large, ratio)
        record: dict[str, Any] = {"ratio": ratio}
    else:
        arch, model = sss.sss_prune(supernet, large)
        record = {"removed_blocks": list(arch.removed)}
    cost = arch_cost(supernet, arch, size)
    return arch, model, {**record, "madds": cost.madds, "params": cost.params}
