"""Evaluation: every static subnet and the largest route, and the gated (dynamic) model.

One pass over the data runs every route on each batch; counts stay on the device and are read
once at the end. The dynamic model is evaluated with the gate's argmax (deterministic): its
accuracy, the mean per-sample MAdds (each sample priced at the route it took, gate included),
the routing histogram, and the gate's agreement with the SGS targets.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from dsnet.models.net import DSNet
from dsnet.routes import Route

__all__ = ["topk_correct", "evaluate_static", "evaluate_plain", "evaluate_dynamic", "format_report", "cost_bias", "sweep_dynamic",
           "plot_report"]

Autocast = Callable[[], contextlib.AbstractContextManager]


def topk_correct(logits: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Counts of samples whose label is in the top-k, one per k; logits [B, K], y [B] -> [len(ks)]."""
    k_max = min(max(ks), logits.shape[1])
    hit = logits.topk(k_max, dim=1).indices.eq(y[:, None])
    return torch.stack([hit[:, :min(k, k_max)].any(1).sum() for k in ks])


def _batches(loader: Iterable, device: torch.device, max_batches: int | None):
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


@torch.inference_mode()
def evaluate_static(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int],
                    autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None,
                    channels_last: bool = False) -> dict:
    """Top-1/top-5 (percent) of the largest route and every static subnet, with their costs."""
    model.eval()
    routes: list[Route] = [model.routes.largest] + model.routes.static_routes
    correct = torch.zeros(len(routes), 2, dtype=torch.long, device=device)
    n = 0
    for x, y in _batches(loader, device, max_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            for j, route in enumerate(routes):
                correct[j] += topk_correct(model(x, subnet=route), y)
        n += y.shape[0]
    acc = (correct.double() * 100.0 / max(n, 1)).tolist()  # the one host sync
    largest = model.route_cost(routes[0], input_size)
    static = []
    for i, route in enumerate(routes[1:]):
        cost = model.route_cost(route, input_size)
        static.append({"subnet": i, "madds": cost.madds, "params": cost.params,
                       "top1": acc[i + 1][0], "top5": acc[i + 1][1]})
    return {"static": static, "largest": {"madds": largest.madds, "params": largest.params,
                                          "top1": acc[0][0], "top5": acc[0][1]},
            "num_samples": n}


@torch.inference_mode()
def evaluate_plain(model: torch.nn.Module, loader: Iterable, device: torch.device,
                   autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None,
                   channels_last: bool = False) -> dict:
    """Top-1/top-5 (percent) of a plain model (a static baseline or an extracted subnet)."""
    model.eval()
    correct = torch.zeros(2, dtype=torch.long, device=device)
    n = 0
    for x, y in _batches(loader, device, max_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            correct += topk_correct(model(x), y)
        n += y.shape[0]
    acc = (correct.double() * 100.0 / max(n, 1)).tolist()
    return {"top1": acc[0], "top5": acc[1], "num_samples": n}


@torch.inference_mode()
def evaluate_dynamic(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int],
                     targets_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     autocast: Autocast = contextlib.nullcontext, logit_bias: Tensor | None = None,
                     max_batches: int | None = None) -> dict:
    """Accuracy, mean MAdds, routing histogram and gate accuracy of the gated model.

    ``targets_fn(x, y) -> [B]`` gives the SGS target (routing-space index) of each sample; the
    gate's accuracy is measured against it when given.
    """
    model.eval()
    costs = torch.tensor(model.dynamic_costs(input_size), dtype=torch.float64, device=device)
    num_routes = len(model.routing_space)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    hist = torch.zeros(num_routes, dtype=torch.long, device=device)
    gate_hits = torch.zeros((), dtype=torch.long, device=device)
    madds = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for x, y in _batches(loader, device, max_batches):
        with autocast():
            out = model.forward_dynamic(x, logit_bias)
            if targets_fn is not None:
                gate_hits += (targets_fn(x, y) == out.choice).sum()
        correct += topk_correct(out.logits, y)
        hist += torch.bincount(out.choice, minlength=num_routes)
        madds += costs[out.choice].sum()
        n += y.shape[0]
    total = max(n, 1)
    acc = (correct.double() * 100.0 / total).tolist()
    return {"top1": acc[0], "top5": acc[1], "madds_mean": float(madds) / total,
            "routing": (hist.double() / total).tolist(),
            "gate_accuracy": float(gate_hits) * 100.0 / total if targets_fn is not None else None}


def static_curve(report: dict, madds: float) -> float | None:
    """Top-1 of the static subnets' accuracy-MAdds curve at ``madds``: linear between the two
    neighbouring subnets (by MAdds); None outside the subnets' MAdds range."""
    points = sorted((row["madds"], row["top1"]) for row in report["static"] if row["subnet"] != "largest")
    for (m0, a0), (m1, a1) in zip(points, points[1:]):
        if m0 <= madds <= m1:
            return a0 if m1 == m0 else a0 + (a1 - a0) * (madds - m0) / (m1 - m0)
    return points[0][1] if len(points) == 1 and madds == points[0][0] else None


def _against_curve(report: dict, madds: float, top1: float) -> str:
    curve = static_curve(report, madds)
    return "" if curve is None else f" (static curve {curve:.2f}, {top1 - curve:+.2f})"


def format_report(report: dict) -> str:
    """A readable table of an eval.json-shaped report."""
    lines = [f"{'route':>10} {'MAdds (M)':>10} {'top-1':>7} {'top-5':>7}"]
    for row in report["static"]:
        name = "largest" if row["subnet"] == "largest" else f"subnet {row['subnet']}"
        lines.append(f"{name:>10} {row['madds'] / 1e6:>10.2f} "
                     f"{row['top1']:>7.2f} {row['top5']:>7.2f}")
    big = report.get("largest")
    if big:
        lines.append(f"{'largest':>10} {big['madds'] / 1e6:>10.2f} {big['top1']:>7.2f} "
                     f"{big.get('top5', float('nan')):>7.2f}")
    dyn = report.get("dynamic")
    if dyn:
        lines.append(f"{'dynamic':>10} {dyn['madds_mean'] / 1e6:>10.2f} {dyn['top1']:>7.2f} {dyn['top5']:>7.2f}"
                     + _against_curve(report, dyn["madds_mean"], dyn["top1"]))
        lines.append("routing: " + ", ".join(f"{f * 100:.1f}%" for f in dyn["routing"])
                     + (f"; gate accuracy {dyn['gate_accuracy']:.1f}%" if dyn.get("gate_accuracy") is not None else ""))
    lines.append(f"samples: {report['num_samples']}")
    return "\n".join(lines)


def cost_bias(model: DSNet, strength: float, input_size: Sequence[int]) -> Tensor:
    """Gate-logit bias of one operating point: ``-strength`` x each route's cost, scaled to [0, 1].

    strength > 0 favours slimmer routes, < 0 wider ones, 0 is the trained gate. Add it to the
    gate's width-head bias to deploy that operating point.
    """
    costs = torch.tensor(model.dynamic_costs(input_size), dtype=torch.float32)
    span = float(costs.max() - costs.min()) or 1.0
    return -strength * (costs - costs.min()) / span


@torch.inference_mode()
def sweep_dynamic(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int],
                  strengths: Sequence[float], autocast: Autocast = contextlib.nullcontext,
                  max_batches: int | None = None) -> list[dict]:
    """Accuracy and mean MAdds of the gate at several operating points (``cost_bias`` strengths).

    Every route of the routing space runs once per sample and the gate's logits are kept; an
    operating point is then a table lookup (routed inference gives these same logits).
    """
    model.eval()
    routes = model.routes.dynamic_routes
    hits, gates = [], []
    for x, y in _batches(loader, device, max_batches):
        with autocast():
            h, gate_logits = model.forward_gate(x)
            hits.append(torch.stack([model.forward_from_gate(h, r).argmax(1) == y for r in routes], 1))
        gates.append(gate_logits.float())
    hit, gate = torch.cat(hits), torch.cat(gates)
    costs = torch.tensor(model.dynamic_costs(input_size), dtype=torch.float64, device=device)
    rows = []
    for s in strengths:
        choice = (gate + cost_bias(model, s, input_size).to(device)).argmax(1)
        rows.append({"strength": float(s), "top1": float(hit.gather(1, choice[:, None]).double().mean()) * 100,
                     "madds_mean": float(costs[choice].mean()),
                     "routing": (torch.bincount(choice, minlength=len(routes)).double() / len(choice)).tolist()})
    return rows


def format_sweep_row(report: dict, row: dict) -> str:
    """One operating point of ``sweep_dynamic`` against the report's static curve."""
    return (f"sweep strength {row['strength']:+.2f}: {row['madds_mean'] / 1e6:.2f} M MAdds, top-1 {row['top1']:.2f}"
            + _against_curve(report, row["madds_mean"], row["top1"]))


def plot_report(report: dict, path: str, sweep: Sequence[dict] | None = None, title: str = "") -> None:
    """Accuracy vs MAdds: static subnets as a curve, the largest route and the dynamic model as points."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("--plot needs matplotlib: pip install 'dsnet[plot]'") from err
    fig, ax = plt.subplots(figsize=(6, 4.5))
    static = report["static"]
    ax.plot([r["madds"] / 1e6 for r in static], [r["top1"] for r in static], "o-", label="static subnets")
    ax.plot([report["largest"]["madds"] / 1e6], [report["largest"]["top1"]], "s", label="largest route")
    if sweep:
        ax.plot([r["madds_mean"] / 1e6 for r in sweep], [r["top1"] for r in sweep], ".--", label="dynamic (sweep)")
    if report.get("dynamic"):
        d = report["dynamic"]
        ax.plot([d["madds_mean"] / 1e6], [d["top1"]], "*", markersize=14, label="dynamic (gate)")
    ax.set_xlabel("MAdds per image (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
