"""Multiply-adds and parameter counts per route, computed from the architecture (no hooks)."""
from __future__ import annotations

from typing import Sequence

from dsnet.errors import UserError
from dsnet.models.net import DSNet
from dsnet.routes import fixed_route

__all__ = ["count_madds", "count_params", "profile", "format_profile", "profile_command"]

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


def profile(model: DSNet, input_size: Sequence[int] | None = None) -> dict:
    """The JSON of ``dsnet profile``: largest route and every static subnet's MAdds and params."""
    size = list(input_size or model.default_input_size)

    def row(subnet: Subnet) -> dict:
        return {"madds": count_madds(model, subnet, size), "params": count_params(model, subnet)}

    return {"model": getattr(model, "model_name", type(model).__name__), "input_size": size,
            "largest": row("largest"),
            "subnets": [{"subnet": i, **row(i)} for i in range(model.num_subnets)]}


def format_profile(report: dict) -> str:
    """The table ``dsnet profile`` prints: one row per static subnet, then the largest route."""
    lines = [f"{report['model']}  input {'x'.join(map(str, report['input_size']))}",
             f"{'subnet':>8} {'MAdds (M)':>12} {'params (M)':>12}"]
    rows = [(row["subnet"], row) for row in report["subnets"]] + [("largest", report["largest"])]
    lines += [f"{name:>8} {row['madds'] / 1e6:>12.1f} {row['params'] / 1e6:>12.3f}" for name, row in rows]
    return "\n".join(lines)


def profile_command(model_name: str, input_size: Sequence[int] | None = None, as_json: bool = False) -> str:
    """``dsnet profile``: the JSON (``as_json``) or the table of ``profile`` for a dsnet model
    name; UserError naming an unknown model or an input size the model cannot take."""
    import json

    import timm

    import dsnet

    if model_name not in dsnet.MODELS:
        raise UserError(f"unknown model '{model_name}' (dsnet models: {', '.join(sorted(dsnet.MODELS))})")
    model = timm.create_model(model_name)
    if input_size is not None and min(input_size) < 1:
        raise UserError(f"--input-size takes three positive integers C H W, got {list(input_size)}")
    if input_size is not None and input_size[0] != model.in_chans:
        raise UserError(f"--input-size channels must be {model.in_chans} for {model_name}, got {input_size[0]}")
    report = profile(model, input_size)
    return json.dumps(report, indent=2) if as_json else format_profile(report)
