"""Multiply-adds and parameter counts per route, computed from the architecture (no hooks)."""
from __future__ import annotations

from typing import Sequence

from dsnet.models.net import DSNet

__all__ = ["count_madds", "count_params", "profile"]

Subnet = int | str | Sequence[int] | None


def _route(model: DSNet, subnet: Subnet):
    if subnet == "dynamic":
        raise ValueError("the dynamic model's cost depends on each input's route: use "
                         "model.dynamic_costs() for per-route MAdds or `dsnet evaluate` for the mean")
    return model.routes.resolve(subnet)


def count_madds(model: DSNet, subnet: Subnet = None, input_size: Sequence[int] | None = None) -> int:
    """Multiply-adds of one forward of one sample along ``subnet`` (index, "largest", route).

    ``input_size`` is (C, H, W), default the model's. A fixed route runs the gate's attention
    head but not its width head, whose cost ``model.dynamic_costs`` adds for gated inference.
    """
    return model.route_cost(_route(model, subnet), input_size).madds


def count_params(model: DSNet, subnet: Subnet = None) -> int:
    """Parameters a route uses (equal to the extracted dense module's parameter count)."""
    return model.route_cost(_route(model, subnet), None).params


def profile(model: DSNet, input_size: Sequence[int] | None = None) -> dict:
    """The JSON of ``dsnet profile``: largest route and every static subnet's MAdds and params."""
    size = list(input_size or model.default_input_size)

    def row(subnet: Subnet) -> dict:
        return {"madds": count_madds(model, subnet, size), "params": count_params(model, subnet)}

    return {"model": getattr(model, "model_name", type(model).__name__), "input_size": size,
            "largest": row("largest"),
            "subnets": [{"subnet": i, **row(i)} for i in range(model.num_subnets)]}
