"""Evaluation: every static subnet and the largest route, and the gated (dynamic) model.

One pass over the data runs every route on each batch; counts stay on the device and are read
once at the end. The dynamic model is evaluated with the gate's argmax (deterministic): its
accuracy, the mean per-sample MAdds (each sample priced at the route it took, gate included),
the routing histogram, and the gate's agreement with the SGS targets.

Under DDP the validation loader holds one rank's shard (``dsnet.data.ShardSampler``: every sample
on exactly one rank); the counts are summed over the ranks before anything is divided, so every
rank reports the whole set's figures, equal to a single-process evaluation.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dsnet.data import ShardSampler
from dsnet.errors import UserError
from dsnet.models.net import DSNet
from dsnet.routes import Route

__all__ = ["topk_hits", "topk_correct", "evaluate_static", "evaluate_plain", "evaluate_dynamic", "evaluate_gated",
           "static_curve", "format_report", "format_sweep_row", "plot_report", "parse_madds", "target_policy",
           "check_classes", "evaluate_command"]

Autocast = Callable[[], contextlib.AbstractContextManager]


def topk_hits(logits: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> list[Tensor]:
    """Per sample, whether its label is in the top-k, one [B] bool tensor per k; logits [B, K], y [B]."""
    k_max = min(max(ks), logits.shape[1])
    hit = logits.topk(k_max, dim=1).indices.eq(y[:, None])
    return [hit[:, :min(k, k_max)].any(1) for k in ks]


def topk_correct(logits: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Counts of samples whose label is in the top-k, one per k; logits [B, K], y [B] -> [len(ks)]."""
    return torch.stack([hit.sum() for hit in topk_hits(logits, y, ks)])


def sharded(loader: Iterable) -> bool:
    """Whether ``loader`` serves one rank's shard of the evaluation set (DDP evaluation)."""
    return isinstance(getattr(loader, "sampler", None), ShardSampler)


def _all_reduce_(loader: Iterable, *counts: Tensor) -> None:
    """Sum ``counts`` in place over the ranks when ``loader`` is one rank's shard (DDP evaluation)."""
    if sharded(loader):
        for t in counts:
            dist.all_reduce(t)


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
    n = torch.zeros((), dtype=torch.long, device=device)
    for x, y in _batches(loader, device, max_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            for j, route in enumerate(routes):
                correct[j] += topk_correct(model(x, subnet=route), y)
        n += y.shape[0]
    _all_reduce_(loader, correct, n)
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
    for x, y in _batches(loader, device, max_batches):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            correct += topk_correct(model(x), y)
        n += y.shape[0]
    _all_reduce_(loader, correct, n)
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
    for x, y in _batches(loader, device, max_batches):
        with autocast():
            out = model.forward_dynamic(x, logit_bias)
            if targets_fn is not None:
                gate_hits += (targets_fn(x, y) == out.choice).sum()
        correct += topk_correct(out.logits, y)
        hist += torch.bincount(out.choice, minlength=num_routes)
        madds += costs[out.choice].sum()
        n += y.shape[0]
    _all_reduce_(loader, correct, hist, gate_hits, madds, n)
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
    from dsnet.policy import Policy

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
    from dsnet.policy import cascade_policy, cascade_thresholds, collect_outcomes, gate_policy, gather_outcomes, score
    from dsnet.sgs import sgs_targets

    outcomes = collect_outcomes(model, _batches(loader, device, max_batches), device, input_size, autocast)
    if sharded(loader):
        outcomes = gather_outcomes(outcomes)
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


def plot_report(report: dict, path: str, title: str = "") -> None:
    """Accuracy vs MAdds: static subnets as a curve, the largest route, the gate's cost-bias sweep,
    the confidence cascade's threshold sweep, and the shipped dynamic model as a star."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("--plot needs matplotlib: pip install 'dsnet[plot]'") from err
    fig, ax = plt.subplots(figsize=(6, 4.5))
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
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- dsnet evaluate --------------------------------------------------------------------------

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


def target_policy(model: DSNet, loader: Iterable, cfg, runtime, input_size: Sequence[int], autocast: Autocast,
                  target: float, kind: str, max_batches: int | None = None) -> dict:
    """The deployment record (``dsnet.policy.select_policy``) of the ``kind`` policy whose mean
    MAdds on ``loader`` is ``target``; UserError when no policy of that kind reaches it."""
    from dsnet.policy import collect_outcomes, gather_outcomes, select_policy

    outcomes = collect_outcomes(model, _batches(loader, runtime.device, max_batches), runtime.device, input_size,
                                autocast)
    if sharded(loader):
        outcomes = gather_outcomes(outcomes)
    try:
        return select_policy(outcomes, kind, target, cfg.gate.fallback_z, images="validation",
                             measure=cfg.gate.cascade_measure)
    except ValueError as err:
        raise UserError(str(err)) from None


def check_classes(state: dict, classes: list[str]) -> None:
    """Refuse evaluation data whose classes are not those the checkpoint was trained on."""
    if state.get("classes") is not None and list(state["classes"]) != classes:
        raise UserError(f"the evaluation data has {len(classes)} classes, the checkpoint was trained on "
                        f"{len(state['classes'])}; pass --data with the dataset it was trained on")


def evaluate_command(checkpoint: str, *, overrides: Sequence[str] = (), data_root: str | None = None,
                     json_path: str | None = None, plot: str | None = None, sweep: int = 0,
                     max_batches: int | None = None, ema: bool = False, target_madds: str | None = None,
                     deploy: str = "gate", output: str | None = None) -> None:
    """``dsnet evaluate``: every static subnet, the largest route and (stage two) the dynamic
    model of ``checkpoint`` on its run's validation data (``data_root`` and ``overrides`` applied
    to its config). Prints the report; writes ``json_path`` (eval.json format) and ``plot``; with
    ``target_madds`` writes a checkpoint shipping that operating point to ``output``."""
    from dsnet.checkpoint import read_checkpoint, save_checkpoint
    from dsnet.engine import autocast_factory, load_run
    from dsnet.policy import Policy
    from dsnet.runs import build_val_loader, data_signature

    if read_checkpoint(checkpoint).get("stage") == "static":
        from dsnet.baselines import evaluate_baseline

        if sweep or plot or ema:
            raise UserError(f"{checkpoint} is a static baseline: --sweep, --plot and --ema need a supernet")
        return evaluate_baseline(checkpoint, overrides, data_root, json_path, max_batches)
    state, model, cfg, runtime = load_run(checkpoint, overrides, data_root, ema)
    if state["stage"] != "gate" and (sweep or target_madds):
        raise UserError(f"--sweep and --target-madds need a gate: {checkpoint} is a stage-one checkpoint "
                        "(run train_gate.py first)")
    out = None
    if target_madds is not None:
        target = parse_madds(target_madds)
        out = Path(output or Path(checkpoint).with_name(f"{Path(checkpoint).stem}-{target_madds}.pth"))
        if out.exists():
            raise UserError(f"{out} exists; choose another -o (dsnet never overwrites a checkpoint here)")
    loader, classes = build_val_loader(cfg, runtime)
    check_classes(state, classes)
    size = (model.in_chans, cfg.data.input_size, cfg.data.input_size)
    autocast, _ = autocast_factory(cfg.train.amp, runtime.device)
    report = evaluate_static(model, loader, runtime.device, size, autocast, max_batches)
    report["data"], report["dynamic"] = data_signature(cfg, classes), None
    if state["stage"] == "gate":
        record = state.get("deploy")
        if out is not None:
            record = target_policy(model, loader, cfg, runtime, size, autocast, target, deploy, max_batches)
            model.set_policy(Policy.from_dict(record["policy"]))
        report.update(evaluate_gated(model, loader, runtime.device, size, cfg.gate.rule, autocast,
                                     max_batches, sweep or 9, cfg.gate.cascade_measure))
        if record:
            report["selection"] = record
    if not runtime.is_main:  # under torchrun every rank holds the whole set's figures
        return
    print(format_report(report))
    for row in report.get("sweep", []) + report.get("cascade", []):
        print(format_sweep_row(report, row))
    if out is not None:
        save_checkpoint({**{k: v for k, v in state.items() if k not in ("format", "version")}, "deploy": record}, out)
        print(f"checkpoint with this operating point -> {out}")
    _write_outputs(report, json_path, plot, f"{state['model_name']} ({Path(checkpoint).name})")


def _write_outputs(report: dict, json_path: str | None, plot: str | None, title: str) -> None:
    from dsnet.runs import write_eval

    if json_path:
        write_eval(Path(json_path), report)
    if plot:
        plot_report(report, plot, title=title)
