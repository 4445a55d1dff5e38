"""Evaluation: every static subnet and the largest route, and the gated (dynamic) model.

One pass over the data runs every route on each batch; counts stay on the device and are read
once at the end. The dynamic model is evaluated with the gate's argmax (deterministic): its
accuracy, the mean per-sample MAdds (each sample priced at the route it took, gate included),
the routing histogram, and the gate's agreement with the SGS targets.

Under DDP the validation loader holds one rank's shard (``dsnet.data.ShardSampler``: every sample
on exactly one rank); the counts are summed over the ranks before anything is divided
(``dsnet.train.metrics``), so every rank reports the whole set's figures, equal to a
single-process evaluation. The ``dsnet evaluate`` command is ``dsnet.report.evaluate``.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from dsnet.errors import UserError
from dsnet.models.net import DSNet
from dsnet.models.policy import Policy
from dsnet.models.routes import Route
from dsnet.train.metrics import Autocast, device_batches, sum_over_shards_, topk_correct
from dsnet.train.policy_select import cascade_policy, cascade_thresholds, gate_policy, loader_outcomes, score
from dsnet.train.sgs import sgs_targets

__all__ = ["evaluate_static", "evaluate_plain", "evaluate_dynamic", "evaluate_gated", "static_curve",
           "format_report", "format_sweep_row", "plot_report", "check_plot_path"]


@torch.inference_mode()
def evaluate_static(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int],
                    autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None,
                    channels_last: bool = False) -> dict:
    """Top-1/top-5 (percent) of the largest route and every static subnet, with their costs."""
    model.eval()
    routes: list[Route] = [model.routes.largest] + model.routes.static_routes
    correct = torch.zeros(len(routes), 2, dtype=torch.long, device=device)
    n = torch.zeros((), dtype=torch.long, device=device)
    for x, y in device_batches(loader, device, max_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            for j, route in enumerate(routes):
                correct[j] += topk_correct(model(x, subnet=route), y)
        n += y.shape[0]
    sum_over_shards_(loader, correct, n)
    n = int(n)
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
    n = torch.zeros((), dtype=torch.long, device=device)
    for x, y in device_batches(loader, device, max_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            correct += topk_correct(model(x), y)
        n += y.shape[0]
    sum_over_shards_(loader, correct, n)
    n = int(n)
    acc = (correct.double() * 100.0 / max(n, 1)).tolist()
    return {"top1": acc[0], "top5": acc[1], "num_samples": n}


@torch.inference_mode()
def evaluate_dynamic(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int],
                     targets_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                     autocast: Autocast = contextlib.nullcontext, logit_bias: Tensor | None = None,
                     max_batches: int | None = None) -> dict:
    """Accuracy, mean MAdds, routing histogram and gate accuracy of the dynamic model, run as
    routed inference under its deployment policy (``model.policy``).

    ``targets_fn(x, y) -> [B]`` gives the SGS target (routing-space index) of each sample; the
    gate's accuracy is measured against it when given.
    """
    model.eval()
    costs = torch.tensor(model.policy_costs(input_size), dtype=torch.float64, device=device)
    num_routes = len(model.routing_space)
    correct = torch.zeros(2, dtype=torch.long, device=device)
    hist = torch.zeros(num_routes, dtype=torch.long, device=device)
    gate_hits = torch.zeros((), dtype=torch.long, device=device)
    madds = torch.zeros((), dtype=torch.float64, device=device)
    n = torch.zeros((), dtype=torch.long, device=device)
    for x, y in device_batches(loader, device, max_batches):
        with autocast():
            out = model.forward_dynamic(x, logit_bias)
            if targets_fn is not None:
                gate_hits += (targets_fn(x, y) == out.choice).sum()
        correct += topk_correct(out.logits, y)
        hist += torch.bincount(out.choice, minlength=num_routes)
        madds += costs[out.choice].sum()
        n += y.shape[0]
    sum_over_shards_(loader, correct, hist, gate_hits, madds, n)
    total = max(int(n), 1)
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
        name = {"largest": "largest", "arch": "architecture"}.get(row["subnet"], f"subnet {row['subnet']}")
        lines.append(f"{name:>10} {row['madds'] / 1e6:>10.2f} "
                     f"{row['top1']:>7.2f} {row['top5']:>7.2f}")
    big = report.get("largest")
    if big:
        lines.append(f"{'largest':>10} {big['madds'] / 1e6:>10.2f} {big['top1']:>7.2f} "
                     f"{big.get('top5', float('nan')):>7.2f}")
    dyn, gate = report.get("dynamic"), report.get("gate")
    if dyn:
        lines.append(f"{'dynamic':>10} {dyn['madds_mean'] / 1e6:>10.2f} {dyn['top1']:>7.2f} {dyn['top5']:>7.2f}"
                     + _against_curve(report, dyn["madds_mean"], dyn["top1"]))
    shipped = (dyn or {}).get("policy") or {"kind": "gate", "strength": 0.0}
    if gate and (shipped["kind"] != "gate" or shipped["strength"] != 0):
        lines.append(f"{'gate':>10} {gate['madds_mean'] / 1e6:>10.2f} {gate['top1']:>7.2f} {gate['top5']:>7.2f}"
                     + _against_curve(report, gate["madds_mean"], gate["top1"]) + "  (as trained, not shipped)")
    if dyn:
        lines.append("routing: " + ", ".join(f"{f * 100:.1f}%" for f in dyn["routing"])
                     + (f"; gate accuracy {dyn['gate_accuracy']:.1f}%" if dyn.get("gate_accuracy") is not None else ""))
        if dyn.get("policy"):
            lines.append(f"policy: {_describe(report)}")
    if report.get("selection"):
        lines.append(f"policy chosen: {report['selection']['reason']}")
    lines.append(f"samples: {report['num_samples']}")
    return "\n".join(lines)


def _describe(report: dict) -> str:
    space = report.get("routing_space") or list(range(len(report["dynamic"]["routing"])))
    return Policy.from_dict(report["dynamic"]["policy"]).describe(space)


def evaluate_gated(model: DSNet, loader: Iterable, device: torch.device, input_size: Sequence[int], rule: str,
                   autocast: Autocast = contextlib.nullcontext, max_batches: int | None = None,
                   sweep: int = 9, measure: str = "margin") -> dict:
    """What ``eval.json`` holds after stage two, beside the static rows:

    - ``dynamic``: the deployment policy run as routed inference (``evaluate_dynamic``), with its
      ``policy`` record and the trained gate's agreement with its SGS targets (rule ``rule``);
    - ``gate``: the gate as trained (no cost bias), scored from the per-image table;
    - ``sweep``: the gate at ``sweep`` cost-bias strengths in [-3, 3];
    - ``cascade``: the confidence cascade (thresholding ``measure``) at ``sweep`` escalation rates
      in [5%, 60%].
    """
    outcomes = loader_outcomes(model, loader, device, input_size, autocast, max_batches)
    dynamic = evaluate_dynamic(model, loader, device, input_size, autocast=autocast, max_batches=max_batches)
    space = list(outcomes.space)
    targets = sgs_targets(outcomes.hit1[:, space].T, rule)
    agreement = float((outcomes.gate_logits.argmax(1) == targets).double().mean()) * 100
    dynamic.update(gate_accuracy=agreement, policy=model.policy.to_dict())
    strengths = [round(-3 + 6 * i / (sweep - 1), 3) for i in range(sweep)] if sweep > 1 else [0.0]
    rates = [round(0.05 + 0.55 * i / (sweep - 1), 3) for i in range(sweep)] if sweep > 1 else [0.2]
    thresholds = cascade_thresholds(outcomes, rates, measure)
    sure = outcomes.confidence[measure]

    def row(policy, **extra) -> dict:
        scored = score(outcomes, policy)
        return {**extra, "top1": scored["top1"], "top5": scored["top5"], "madds_mean": scored["madds_mean"],
                "routing": scored["routing"]}

    return {"dynamic": dynamic, "routing_space": space,
            "gate": {**row(gate_policy(outcomes, 0.0)), "gate_accuracy": agreement},
            "sweep": [row(gate_policy(outcomes, t), strength=t) for t in strengths],
            "cascade": [row(cascade_policy(q, measure), threshold=q, measure=measure,
                            escalated=float((sure < q).double().mean())) for q in thresholds]}


def format_sweep_row(report: dict, row: dict) -> str:
    """One operating point of the gate's sweep (``strength``) or the cascade's (``threshold``)
    against the report's static curve."""
    what = (f"gate  strength {row['strength']:+.2f}" if "strength" in row
            else f"cascade {row['escalated'] * 100:4.1f}% escalated")
    return (f"{what}: {row['madds_mean'] / 1e6:.2f} M MAdds, top-1 {row['top1']:.2f}"
            + _against_curve(report, row["madds_mean"], row["top1"]))


def check_plot_path(path: str, option: str = "--plot") -> None:
    """Refuse ``--plot path`` (or another ``option`` that writes a plot) before any evaluation:
    matplotlib missing, a folder that does not exist, or an extension matplotlib cannot write
    (naming the ones it can)."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise UserError(f"{option} needs matplotlib: pip install 'dsnet[plot]'") from None
    folder = Path(path).parent
    if not folder.is_dir():
        raise UserError(f"{option} {path}: the folder {folder} does not exist; create it or choose another path")
    kinds = Figure().canvas.get_supported_filetypes()
    ext = Path(path).suffix.lstrip(".").lower()
    if ext not in kinds:
        raise UserError(f"{option} {path}: matplotlib cannot write '{Path(path).suffix or 'no extension'}'; "
                        f"use one of {', '.join('.' + k for k in sorted(kinds))}")


def plot_report(report: dict, path: str, title: str = "") -> None:
    """Accuracy vs MAdds: static subnets as a curve, the largest route, the gate's cost-bias sweep,
    the confidence cascade's threshold sweep, and the shipped dynamic model as a star."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("--plot needs matplotlib: pip install 'dsnet[plot]'") from err
    fig, ax = plt.subplots(figsize=(6, 5.5))
    static = report["static"]
    ax.plot([r["madds"] / 1e6 for r in static], [r["top1"] for r in static], "o-", label="static subnets")
    ax.plot([report["largest"]["madds"] / 1e6], [report["largest"]["top1"]], "s", label="largest route")
    for key, style, label in (("sweep", ".--", "gate (cost-bias sweep)"), ("cascade", "x:", "confidence cascade")):
        rows = sorted(report.get(key) or [], key=lambda r: r["madds_mean"])
        if rows:
            ax.plot([r["madds_mean"] / 1e6 for r in rows], [r["top1"] for r in rows], style, label=label)
    if report.get("dynamic"):
        d = report["dynamic"]
        ax.plot([d["madds_mean"] / 1e6], [d["top1"]], "*", markersize=14, label=f"dynamic ({_describe(report)})")
    ax.set_xlabel("MAdds per image (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    # below the axes, clear of the y label and the data points
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize="small", frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
