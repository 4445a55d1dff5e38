"""Multiply-adds and parameter counts per route, computed from the architecture (no hooks).

``dsnet profile`` also takes one plain model, a static baseline checkpoint or an architecture
file: its analytic cost (``dsnet.baselines.static_cost``, ``dsnet.arch.arch_cost``) is checked
against a measurement of the model itself (``measured_cost``) before it is printed.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dsnet.errors import UserError
from dsnet.models.net import DSNet, RouteCost
from dsnet.routes import fixed_route

__all__ = ["count_madds", "count_params", "profile", "format_profile", "measured_cost", "static_profile",
           "format_static_profile", "profile_command"]

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


# ---- one plain model: a static baseline checkpoint or an architecture file ----------------------

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


def _load_plain(path: Path, input_size: Sequence[int] | None) -> tuple[nn.Module, DSNet, Any, tuple, RouteCost]:
    """(plain model, its supernet, its ``subnet`` (index, "largest" or "arch"), input size,
    analytic cost) of a static checkpoint or, for a ``.json`` file, an architecture."""
    from dsnet.arch import arch_cost, build_plain, load_architecture
    from dsnet.baselines import load_static, static_cost
    from dsnet.checkpoint import read_checkpoint
    from dsnet.export import input_size_of

    if path.suffix == ".json":
        arch, supernet = load_architecture(path, str(path))
        size = input_size_of(supernet, {}, input_size)
        return build_plain(supernet, arch), supernet, "arch", size, arch_cost(supernet, arch, size)
    state = read_checkpoint(path, "static")
    model, supernet = load_static(state)
    size = input_size_of(supernet, state, input_size)
    return model, supernet, state["subnet"], size, static_cost(state, supernet, size)


def static_profile(path: str, input_size: Sequence[int] | None = None) -> dict:
    """The JSON of ``dsnet profile`` for a static baseline checkpoint or an architecture JSON file:
    ``{"model", "source", "subnet" (index, "largest" or "arch"), "input_size", "madds", "params"}``.
    The analytic cost must equal ``measured_cost``; a ValueError (a dsnet bug) otherwise."""
    model, supernet, subnet, size, cost = _load_plain(Path(path), input_size)
    measured = measured_cost(model, size)
    if measured != cost:
        raise ValueError(f"{path}: dsnet's analytic (MAdds, params) {tuple(cost)} differ from the model's "
                         f"measured {tuple(measured)}; this is a dsnet bug, please report it")
    return {"model": supernet.model_name, "source": str(path), "subnet": subnet, "input_size": list(size),
            "madds": cost.madds, "params": cost.params}


def format_static_profile(report: dict) -> str:
    """The lines ``dsnet profile`` prints for one plain model."""
    kind = "architecture" if report["subnet"] == "arch" else f"subnet {report['subnet']}"
    return (f"{report['model']} {kind} ({report['source']})  input {'x'.join(map(str, report['input_size']))}\n"
            f"MAdds {report['madds'] / 1e6:.3f} M, params {report['params'] / 1e6:.4f} M "
            "(equal to FlopCounterMode's count and the module's own)")


def profile_command(model_name: str, input_size: Sequence[int] | None = None, as_json: bool = False) -> str:
    """``dsnet profile``: the JSON (``as_json``) or the table of ``profile`` for a dsnet model
    name, or of ``static_profile`` for a static checkpoint or an architecture file; UserError
    naming an unknown model or file or an input size the model cannot take."""
    import json

    import timm

    import dsnet

    if model_name not in dsnet.MODELS and Path(model_name).is_file():
        report = static_profile(model_name, input_size)
        return json.dumps(report, indent=2) if as_json else format_static_profile(report)
    if model_name not in dsnet.MODELS:
        raise UserError(f"'{model_name}' is neither a dsnet model name ({', '.join(sorted(dsnet.MODELS))}) nor an "
                        "existing file (a static baseline checkpoint or an architecture JSON file)")
    model = timm.create_model(model_name)
    if input_size is not None and min(input_size) < 1:
        raise UserError(f"--input-size takes three positive integers C H W, got {list(input_size)}")
    if input_size is not None and input_size[0] != model.in_chans:
        raise UserError(f"--input-size channels must be {model.in_chans} for {model_name}, got {input_size[0]}")
    report = profile(model, input_size)
    return json.dumps(report, indent=2) if as_json else format_profile(report)
