"""Multiply-adds and parameter counts per route, computed from the architecture (no hooks), and
the measurement they are checked against (``measured_cost``: torch's FlopCounterMode and the
module's own parameter count).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsnet.errors import UserError
from dsnet.models.net import DSNet, RouteCost
from dsnet.models.routes import fixed_route

__all__ = ["Subnet", "count_madds", "count_params", "measured_cost", "parse_madds"]


Subnet = int | str | Sequence[int] | None


def count_madds(model: DSNet, subnet: Subnet = None, input_size: Sequence[int] | None = None) -> int:
    """Multiply-adds of one forward of one sample along ``subnet`` (index, "largest", route).

    ``input_size`` is (C, H, W), default the model's. A fixed route runs the gate's attention
    head but not its width head, whose cost ``model.dynamic_costs`` adds for gated inference.
    """
    return model.route_cost(fixed_route(model, subnet), input_size).madds


def count_params(model: DSNet, subnet: Subnet = None) -> int:
    """Parameters a route uses (equal to the extracted dense module's parameter count)."""
    return model.route_cost(fixed_route(model, subnet), None).params


def _pool_adds(x_shape: Sequence[int], *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    """One add per input element of an average pool (``aten.mean`` over H, W), as dsnet counts it."""
    return math.prod(x_shape)


@torch.no_grad()
def measured_cost(model: nn.Module, input_size: Sequence[int]) -> RouteCost:
    """A plain model's cost measured on it: MAdds of one (C, H, W) sample as ``FlopCounterMode``
    counts them (conv and linear FLOPs / 2) plus one add per input element of every average pool
    (every ``mean`` of a plain dsnet model), the convention of ``dsnet.models.blocks``; parameters
    as the module holds them (BN weight and bias counted, running statistics are buffers)."""
    p = next(model.parameters())
    x = torch.zeros(1, *input_size, dtype=p.dtype, device=p.device)
    with FlopCounterMode(display=False, custom_mapping={torch.ops.aten.mean: _pool_adds}) as counter:
        model(x)
    flops = dict(counter.get_flop_counts()["Global"])
    pools = flops.pop(torch.ops.aten.mean, 0)
    return RouteCost(sum(flops.values()) // 2 + pools, sum(q.numel() for q in model.parameters()))


def parse_madds(text: str) -> float:
    """``12M``, ``1.5G``, ``800k`` or a plain number -> MAdds; UserError naming the value otherwise."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) * units[raw[-1].lower()] if raw and raw[-1].lower() in units else float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UserError(f"--target-madds takes a positive number of MAdds such as 12M, 1.5G or 800k, got {text!r}")
    return value
