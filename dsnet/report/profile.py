"""``dsnet profile``: MAdds and parameters of every route of a supernet (``dsnet.models.madds``, computed
from the architecture, no hooks).

It also takes one plain model, a static baseline checkpoint or an architecture
file: its analytic cost (``dsnet.prune.static.static_cost``, ``dsnet.prune.arch.arch_cost``) is checked
against a measurement of the model itself (``measured_cost``) before it is printed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import timm
from torch import nn

from dsnet.errors import UserError
from dsnet.models import MODELS
from dsnet.models.madds import Subnet, count_madds, count_params, measured_cost
from dsnet.models.net import DSNet, RouteCost
from dsnet.prune.arch import arch_cost, build_plain, load_architecture
from dsnet.prune.static import load_static, static_cost
from dsnet.train.checkpoint import input_size_of, read_checkpoint

__all__ = ["profile", "format_profile", "static_profile", "format_static_profile", "profile_command"]


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


def _load_plain(path: Path, input_size: Sequence[int] | None) -> tuple[nn.Module, DSNet, Any, tuple, RouteCost]:
    """(plain model, its supernet, its ``subnet`` (index, "largest" or "arch"), input size,
    analytic cost) of a static checkpoint or, for a ``.json`` file, an architecture."""
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
    if model_name not in MODELS and Path(model_name).is_file():
        report = static_profile(model_name, input_size)
        return json.dumps(report, indent=2) if as_json else format_static_profile(report)
    if model_name not in MODELS:
        raise UserError(f"'{model_name}' is neither a dsnet model name ({', '.join(sorted(MODELS))}) nor an "
                        "existing file (a static baseline checkpoint or an architecture JSON file)")
    model = timm.create_model(model_name)
    if input_size is not None and min(input_size) < 1:
        raise UserError(f"--input-size takes three positive integers C H W, got {list(input_size)}")
    if input_size is not None and input_size[0] != model.in_chans:
        raise UserError(f"--input-size channels must be {model.in_chans} for {model_name}, got {input_size[0]}")
    report = profile(model, input_size)
    return json.dumps(report, indent=2) if as_json else format_profile(report)
