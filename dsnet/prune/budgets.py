"""Training budgets of the static baselines (Liu et al., ICLR 2019; formulas in ``dsnet.prune.baselines``).

Scratch-E keeps the supernet run's optimizer steps; Scratch-B spends the large model's training
MAdds on the small one; Scratch-B-supernet spends the supernet run's. Fine-tuning after pruning
lasts ``train.epochs / 4`` epochs by default.
"""
from __future__ import annotations

from dsnet.config import Config
from dsnet.errors import UserError
from dsnet.models.net import DSNet

__all__ = ["BUDGETS", "FINETUNE_FRACTION", "Subnet", "sandwich_madds", "budget_steps", "finetune_epochs_default"]

BUDGETS = ("scratch-e", "scratch-b", "scratch-b-supernet")
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
