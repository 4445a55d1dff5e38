"""``dsnet compare RUN_DIR ...``: the supernet's static subnets, the dynamic model and the static
baselines of several runs in one accuracy-vs-MAdds table and plot.

Each argument is an ``eval.json`` or a folder searched recursively for them, so the supernet run
directory alone (with its ``gate/`` and ``<method>-<subnet>/`` baseline runs inside) is enough.
Every report must come from the same evaluation set (its ``data`` record and sample count); a run
evaluated elsewhere is refused, naming both runs. A ``dsnet search`` folder (its ``eval.json``)
adds the searched architecture, shown beside the uniform subnet and the dynamic model nearest its
target and with its and the subnet's fine-tuned (``--prune inherited``), Scratch-E and Scratch-B runs
(``search_rows``).

``--curves`` adds learning curves: the top-1 of the slimmest and the largest route at every
evaluated epoch of each stage-one run (its ``metrics.jsonl``), one line per run, to compare runs
that differ in one setting (``ieb.teacher``, a seed) along the way, not only at the end.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from dsnet.errors import UserError
from dsnet.train.evaluate import check_plot_path

__all__ = ["SERIES", "PRUNED", "collect", "compare_rows", "format_compare", "study_rows", "format_study",
           "search_rows", "format_search", "plot_compare", "learning_curves", "format_curves", "plot_curves",
           "compare_command"]

# plot and table order; labels as the table prints them
SERIES = {"supernet": "DS-Net supernet (static subnets)", "dynamic": "DS-Net dynamic (shipped policy)",
          "gate": "DS-Net gate (cost-bias sweep)", "cascade": "confidence cascade (threshold sweep)",
          "scratch-e": "Scratch-E", "scratch-b": "Scratch-B", "scratch-b-supernet": "Scratch-B (supernet's MAdds)",
          "l1": "L1-pruned + fine-tuned", "thinet": "ThiNet + fine-tuned",
          "regression": "regression-pruned + fine-tuned", "weight": "weight-pruned + fine-tuned",
          "scratch-e-sparse": "Scratch-E (weight-pruned's zeros)",
          "scratch-b-sparse": "Scratch-B (weight-pruned's zeros)",
          "slimming-train": "large model, slimming's BN penalty", "sss-train": "large model, SSS's factors",
          "slimming": "Network Slimming + fine-tuned", "sss": "SSS + fine-tuned",
          "scratch-e-arch": "Scratch-E (found architecture)", "scratch-b-arch": "Scratch-B (found architecture)",
          "search": "searched architecture (inherited)", "inherited": "inherited from the supernet + fine-tuned"}
# the study's pruning methods, in Liu et al.'s order: predefined architectures, then found ones, then
# the supernet's own weights fine-tuned at a subnet or architecture: Liu et al.'s question asked of the
# supernet (does inheriting its weights beat training that architecture from scratch?), so it sits in
# the study beside the Scratch-E/B runs of the same architecture as every fine-tuned model does
PRUNED = ("l1", "thinet", "regression", "weight", "slimming", "sss", "inherited")


def collect(paths: Sequence[str | Path]) -> list[tuple[Path, dict]]:
    """(path, report) of every eval.json under ``paths``, in a stable order."""
    found: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            found.append(p)
        elif p.is_dir():
            hits = sorted(p.rglob("eval.json"))
            if not hits:
                raise UserError(f"{p} holds no eval.json (a finished run writes one)")
            found += hits
        else:
            raise UserError(f"{p} does not exist (give run directories or eval.json files)")
    reports = []
    for f in dict.fromkeys(q.resolve() for q in found):
        try:
            report = json.loads(f.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise UserError(f"{f} is not a readable eval.json ({type(err).__name__})") from None
        if not isinstance(report, dict) or not isinstance(report.get("static"), list) or "num_samples" not in report:
            raise UserError(f"{f} is not a dsnet eval.json (no 'static' list and 'num_samples')")
        reports.append((f, report))
    return reports


def _check_same_data(reports: list[tuple[Path, dict]]) -> None:
    first, ref = reports[0]
    for path, r in reports[1:]:
        same = r["num_samples"] == ref["num_samples"] and (
            r.get("data") is None or ref.get("data") is None or r["data"] == ref["data"])
        if not same:
            raise UserError(f"{path} and {first} were evaluated on different data "
                             f"({r.get('data') or r['num_samples']} vs {ref.get('data') or ref['num_samples']} "
                             f"samples); compare runs that share a dataset")


def compare_rows(reports: list[tuple[Path, dict]]) -> list[dict]:
    """One row per model: method, run, subnet, MAdds, params, top-1, top-5 (and routing)."""
    if not reports:
        raise UserError("no eval.json to compare")
    _check_same_data(reports)
    rows: list[dict] = []
    has_supernet = any("baseline" not in r and r.get("dynamic") is None for _, r in reports)
    for path, r in reports:
        run = str(path.parent)
        if "baseline" in r:
            for row in r["static"]:
                sparse = r["baseline"]["method"] != "weight" and r["baseline"].get("sparsity") is not None
                b = r["baseline"]
                rows.append({"method": b["method"] + ("-sparse" if sparse else ""), "run": run, **_row(row),
                             "epochs": b.get("epochs"), "madds_sparse": b.get("madds_sparse"),
                             "sparsity": b.get("sparsity"), "architecture_from": b.get("architecture_from"),
                             "target_madds": b.get("target_madds"), "supernet": b.get("supernet")})
            continue
        if r.get("dynamic") is None or not has_supernet:  # a gate run repeats its supernet's table
            rows += [{"method": "supernet", "run": run, **_row(row)} for row in r["static"]]
            if r.get("largest"):
                rows.append({"method": "supernet", "run": run, "subnet": "largest",
                             "madds": r["largest"]["madds"], "params": None, "top1": r["largest"]["top1"],
                             "top5": r["largest"].get("top5")})
        if r.get("dynamic") is not None:
            d = r["dynamic"]
            rows.append({"method": "dynamic", "run": run, "subnet": "dynamic", "madds": d["madds_mean"],
                         "params": None, "top1": d["top1"], "top5": d["top5"], "routing": d["routing"],
                         "policy": d.get("policy")})
            for method, key, name in (("gate", "sweep", "strength"), ("cascade", "cascade", "escalated")):
                rows += [{"method": method, "run": run, "subnet": f"{name[0]}={pt[name]:+.2f}" if name == "strength"
                          else f"{pt[name] * 100:.0f}%", "madds": pt["madds_mean"], "params": None,
                          "top1": pt["top1"], "top5": pt.get("top5")} for pt in r.get(key) or []]
    order = list(SERIES)
    return sorted(rows, key=lambda x: (order.index(x["method"]) if x["method"] in order else len(order),
                                       x["madds"]))


def _row(row: dict) -> dict:
    return {k: row.get(k) for k in ("subnet", "madds", "params", "top1", "top5")}


def _cost(r: dict) -> float:
    """What a row's model costs per image: its sparse MAdds when weight-pruned, else its MAdds."""
    return r["madds_sparse"] if r.get("madds_sparse") is not None else r["madds"]


def format_compare(rows: list[dict]) -> str:
    """The table: a weight-pruned model's sparse MAdds (non-zero weights) sit beside its dense ones."""
    sparse = any(r.get("madds_sparse") is not None for r in rows)
    lines = [f"{'method':<38} {'subnet':>8} {'MAdds (M)':>10}" + (f" {'sparse (M)':>10}" if sparse else "")
             + f" {'top-1':>7} {'top-5':>7}"]
    for r in rows:
        top5 = f"{r['top5']:>7.2f}" if r.get("top5") is not None else f"{'-':>7}"
        cell = (f" {r['madds_sparse'] / 1e6:>10.2f}" if r.get("madds_sparse") is not None else f" {'-':>10}") \
            if sparse else ""
        lines.append(f"{SERIES.get(r['method'], r['method']):<38} {str(r['subnet']):>8} "
                     f"{r['madds'] / 1e6:>10.2f}{cell} {r['top1']:>7.2f} {top5}")
    return "\n".join(lines)


def _same_architecture(pruned: dict, scratch: dict) -> bool:
    """Whether a scratch (or inherited) row trains the architecture of a pruned row."""
    if pruned.get("architecture_from") is not None:  # an architecture file fine-tuned (--prune inherited)
        source = scratch.get("architecture_from")
        return source is not None and Path(source).resolve() == Path(pruned["architecture_from"]).resolve()
    if pruned["method"] in ("slimming", "sss", "search"):
        source = scratch.get("architecture_from")
        return source is not None and Path(source).resolve().parent == Path(pruned["run"]).resolve()
    if pruned["method"] == "weight":
        return scratch["method"].endswith("-sparse") and scratch.get("sparsity") == pruned.get("sparsity")
    return not scratch["method"].endswith(("-sparse", "-arch")) and scratch["subnet"] == pruned["subnet"]


def study_rows(rows: list[dict]) -> list[dict]:
    """Liu et al.'s table: each pruned and fine-tuned model beside its architecture trained from
    scratch (Scratch-E, Scratch-B; None where that run is missing)."""
    study = []
    for p in (r for m in PRUNED for r in rows if r["method"] == m):
        twins = {}
        for budget in ("scratch-e", "scratch-b"):
            hits = [r for r in rows if r["method"] in (budget, f"{budget}-sparse", f"{budget}-arch")
                    and _same_architecture(p, r)]  # not scratch-b-supernet: another budget
            twins[budget] = hits[0]["top1"] if hits else None
        study.append({"method": p["method"], "run": p["run"], "madds": _cost(p), "params": p["params"],
                      "fine_tuned": p["top1"], "scratch_e": twins["scratch-e"], "scratch_b": twins["scratch-b"]})
    return study


def format_study(study: list[dict]) -> str:
    """The study's table: method x (fine-tuned, Scratch-E, Scratch-B) with MAdds (sparse for weight
    pruning) and parameters."""
    def cell(v):
        return f"{v:>10.2f}" if v is not None else f"{'-':>10}"

    names = [f"{SERIES[s['method']].removesuffix(' + fine-tuned')} ({Path(s['run']).name})" for s in study]
    width = max([44, *map(len, names)])
    lines = [f"{'pruned model (its run)':<{width}} {'MAdds (M)':>9} {'params (M)':>10} {'fine-tuned':>10} "
             f"{'Scratch-E':>10} {'Scratch-B':>10}"]
    for s, name in zip(study, names):
        params = f"{s['params'] / 1e6:>10.3f}" if s.get("params") is not None else f"{'-':>10}"
        lines.append(f"{name:<{width}} {s['madds'] / 1e6:>9.2f} {params} {cell(s['fine_tuned'])} "
                     f"{cell(s['scratch_e'])} {cell(s['scratch_b'])}")
    return "\n".join(lines)


def _top1(rows: list[dict], match) -> float | None:
    hits = [r["top1"] for r in rows if match(r)]
    return hits[0] if hits else None


def _nearest(rows: list[dict], madds: float) -> dict | None:
    return min(rows, key=lambda r: abs(r["madds"] - madds)) if rows else None


def search_rows(rows: list[dict]) -> list[dict]:
    """Each searched architecture (``dsnet search``) beside the uniform subnet of its supernet
    and the dynamic operating point (shipped policy or gate sweep) whose MAdds are nearest its
    target, with the fine-tuned (``--prune inherited``), Scratch-E and Scratch-B runs of each
    architecture (None where missing)."""
    out = []
    for s in (r for r in rows if r["method"] == "search"):
        target = s.get("target_madds") or s["madds"]
        subnets = [r for r in rows if r["method"] == "supernet" and isinstance(r["subnet"], int)]
        source = Path(s["supernet"]).resolve().parent.parent if s.get("supernet") else None
        uniform = _nearest([r for r in subnets if Path(r["run"]).resolve() == source] or subnets, target)
        dynamic = _nearest([r for r in rows if r["method"] in ("dynamic", "gate")], target)
        entry = {"run": s["run"], "target_madds": target, "searched": {
            "madds": s["madds"], "params": s["params"], "inherited": s["top1"],
            **{key: _top1(rows, lambda r, m=m: r["method"] == m and _same_architecture(s, r))
               for key, m in (("fine_tuned", "inherited"), ("scratch_e", "scratch-e-arch"),
                              ("scratch_b", "scratch-b-arch"))}}, "uniform": None, "dynamic": None}
        if uniform is not None:
            subnet = uniform["subnet"]
            entry["uniform"] = {"subnet": subnet, "madds": uniform["madds"], "inherited": uniform["top1"],
                                **{key: _top1(rows, lambda r, m=m: r["method"] == m and r["subnet"] == subnet)
                                   for key, m in (("fine_tuned", "inherited"), ("scratch_e", "scratch-e"),
                                                  ("scratch_b", "scratch-b"))}}
        if dynamic is not None:
            label = "shipped policy" if dynamic["method"] == "dynamic" else f"gate {dynamic['subnet']}"
            entry["dynamic"] = {"label": label, "madds": dynamic["madds"], "top1": dynamic["top1"]}
        out.append(entry)
    return out


def format_search(searches: list[dict]) -> str:
    """The search's table: per searched architecture, its row, the uniform subnet's and the dynamic model's."""
    def cell(v):
        return f"{v:>10.2f}" if v is not None else f"{'-':>10}"

    lines = [f"{'model':<40} {'MAdds (M)':>9} {'inherited':>10} {'fine-tuned':>10} {'Scratch-E':>10} "
             f"{'Scratch-B':>10}"]
    for s in searches:
        a = s["searched"]
        lines.append(f"{'searched (' + Path(s['run']).name + ')':<40} {a['madds'] / 1e6:>9.2f} {cell(a['inherited'])} "
                     f"{cell(a['fine_tuned'])} {cell(a['scratch_e'])} {cell(a['scratch_b'])}")
        if s["uniform"] is not None:
            u = s["uniform"]
            lines.append(f"{'uniform subnet ' + str(u['subnet']):<40} {u['madds'] / 1e6:>9.2f} {cell(u['inherited'])} "
                         f"{cell(u['fine_tuned'])} {cell(u['scratch_e'])} {cell(u['scratch_b'])}")
        if s["dynamic"] is not None:
            d = s["dynamic"]
            lines.append(f"{'dynamic (' + d['label'] + ')':<40} {d['madds'] / 1e6:>9.2f} {cell(d['top1'])} "
                         f"{cell(None)} {cell(None)} {cell(None)}")
    return "\n".join(lines)


def plot_compare(rows: list[dict], path: str | Path, title: str = "") -> None:
    """Accuracy vs MAdds (sparse MAdds for weight-pruned models), one series per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise UserError("--plot needs matplotlib: pip install 'dsnet[plot]'") from err
    styles = {"supernet": "o-", "dynamic": "*", "gate": ".--", "cascade": "x:", "scratch-e": "s--",
              "scratch-b": "^--", "scratch-b-supernet": "v--", "l1": "D:", "thinet": "P:", "regression": "X:",
              "weight": "h:", "scratch-e-sparse": "s", "scratch-b-sparse": "^", "slimming": "d", "sss": "p",
              "scratch-e-arch": "s", "scratch-b-arch": "^", "slimming-train": "o", "sss-train": "o", "search": "H",
              "inherited": "8"}
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    supernets = {r["run"] for r in rows if r["method"] == "supernet"}
    # a baseline series gathers its runs; each supernet (and its gate) is a series of its own
    keys = dict.fromkeys((r["method"], r["run"] if r["method"] in ("supernet", "dynamic", "gate", "cascade") else "")
                         for r in rows)
    for method, run in keys:
        pts = [r for r in rows if r["method"] == method and (not run or r["run"] == run)]
        label = SERIES.get(method, method) + (f" ({Path(run).name})" if run and len(supernets) > 1 else "")
        ax.plot([_cost(r) / 1e6 for r in pts], [r["top1"] for r in pts], styles.get(method, "x-"),
                markersize=14 if method == "dynamic" else 6, label=label)
    ax.set_xlabel("MAdds per image (M)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _json_line(line: str) -> dict:
    """A metrics.jsonl record; {} for a line a killed run left half written."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return record if isinstance(record, dict) else {}


def _ends(record: dict) -> dict[str, float]:
    """The top-1 of the slimmest and the largest route in an evaluated epoch's record."""
    return {"slimmest": record["eval"]["static"][0]["top1"], "largest": record["eval"]["largest"]["top1"]}


def learning_curves(paths: Sequence[str | Path]) -> list[dict]:
    """Each stage-one run under ``paths`` (a folder with a ``metrics.jsonl`` of stage
    ``supernet``): its evaluated epochs and the top-1 of its slimmest and largest route at each,
    with the running BN statistics the loop evaluates with; and ``final``, the same two after the
    last epoch's BN recalibration (what its eval.json reports), where the run did that."""
    files: list[Path] = []
    for p in map(Path, paths):
        files += [p] if p.name == "metrics.jsonl" else sorted(p.rglob("metrics.jsonl")) if p.is_dir() else []
    curves = []
    for f in dict.fromkeys(files):
        evaluated = [r for r in map(_json_line, f.read_text().splitlines())
                     if r.get("stage") == "supernet" and "eval" in r]
        during = [r for r in evaluated if not r.get("recalibrated")]
        if not during:
            continue
        final = [_ends(r) for r in evaluated if r.get("recalibrated")]
        points = [_ends(r) for r in during]
        curves.append({"run": str(f.parent), "epoch": [r["epoch"] for r in during],
                       **{end: [p[end] for p in points] for end in ("slimmest", "largest")},
                       "final": final[-1] if final else None})
    if not curves:
        raise UserError(f"--curves: no stage-one run with an evaluated epoch under {', '.join(map(str, paths))} "
                        "(curves come from a supernet run's metrics.jsonl; train.eval_interval sets how often it "
                        "evaluates)")
    return curves


def format_curves(curves: list[dict]) -> str:
    """One line per run: top-1 of the slimmest / largest route at each evaluated epoch, then after
    the final BN recalibration."""
    width = max(len(c["run"]) for c in curves)
    lines = []
    for c in curves:
        points = [f"ep{e} {s:.2f}/{l:.2f}" for e, s, l in zip(c["epoch"], c["slimmest"], c["largest"])]
        if c["final"]:
            points.append(f"recalibrated {c['final']['slimmest']:.2f}/{c['final']['largest']:.2f}")
        lines.append(f"{c['run']:<{width}}  " + "  ".join(points))
    return "\n".join(lines)


def plot_curves(curves: list[dict], path: str | Path) -> None:
    """Top-1 vs epoch, the slimmest route on the left and the largest on the right, one line per
    run; a star at the last epoch for the value after the final BN recalibration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharex=True)
    axes[0].xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs
    common = Path(*Path(curves[0]["run"]).parts[:-1]) if len(curves) > 1 else None
    for c in curves:
        label = str(Path(c["run"]).relative_to(common)) if common and Path(c["run"]).is_relative_to(common) else c["run"]
        for ax, route in zip(axes, ("slimmest", "largest")):
            (line,) = ax.plot(c["epoch"], c[route], "o-", label=label)
            if c["final"]:
                ax.plot([c["epoch"][-1]], [c["final"][route]], "*", markersize=11, color=line.get_color())
    for ax, route in zip(axes, ("slimmest route", "largest route")):
        ax.set_title(f"{route} (star: after the final BN recalibration)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("top-1 accuracy (%)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare_command(paths: Sequence[str], json_path: str | None, plot_path: str | None,
                    curves_path: str | None = None) -> str:
    """What ``dsnet compare`` does; returns the table it prints."""
    for option, path in (("--plot", plot_path), ("--curves", curves_path)):
        if path:
            check_plot_path(path, option)
    reports = collect(paths)
    curves = learning_curves(paths) if curves_path else []
    rows = compare_rows(reports)
    study, searches = study_rows(rows), search_rows(rows)
    if json_path:
        out = {"rows": rows, "study": study, "search": searches, "curves": curves, "num_samples": reports[0][1]["num_samples"],
               "data": reports[0][1].get("data"), "reports": [str(p) for p, _ in reports]}
        Path(json_path).write_text(json.dumps(out, indent=2))
    if plot_path:
        plot_compare(rows, plot_path, title="accuracy vs MAdds")
    table = format_compare(rows)
    if study:
        table += ("\n\nLiu et al.'s study: each pruned model against its architecture trained from scratch (top-1)\n"
                  + format_study(study))
    if searches:
        table += ("\n\nSearched architectures beside the uniform subnet and the dynamic model nearest their target "
                  "(top-1)\n" + format_search(searches))
    if curves:
        plot_curves(curves, curves_path)
        table += ("\n\nLearning curves: top-1 of the slimmest / largest route at each evaluated epoch\n"
                  + format_curves(curves))
    return table
