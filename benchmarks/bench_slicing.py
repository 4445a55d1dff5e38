"""Does running a subnet on slices of the supernet cost what the dense subnet costs?

For every static subnet (and the largest route) of each model, time the supernet path
``model(x, subnet=i)`` against the extracted dense module ``dsnet.extract_subnet(model, i)`` on
the same input, in eval mode under ``torch.inference_mode()`` with a fixed thread count. The
supernet runs its inference plan there (``dsnet.models.net``: plain functions over cached
slices); its module path (``model.inference_plans = False``, what runs with autograd on) is
timed too. After a warm-up, each repeat times the three back to back (rotating which goes
first), so drifts in clock speed or load hit all alike; the median per path is reported, and a
ratio is the median of the per-repeat ratios path / dense. The target is <= 1.05 for every
subnet (``ratio``, the plan).

    python benchmarks/bench_slicing.py --models ds_resnet20 --batch-sizes 1 32 --json out.json
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from typing import Callable

import timm
import torch

import dsnet
from dsnet.layers import DSBatchNorm2d

TARGET = 1.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ds_mobilenet_v1", "ds_resnet20"],
                   help="dsnet model names; each runs at its default input size")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--subnets", nargs="+", metavar="I",
                   help="only these routes (static subnet indices or 'largest'; default: all)")
    p.add_argument("--repeats", type=int, default=15, help="timed repeats per path")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per path first")
    p.add_argument("--min-ms", type=float, default=20.0,
                   help="each timed sample loops the call until it lasts about this long")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--cpu-time", action="store_true",
                   help="time process CPU time instead of wall time: steadier on a shared machine, "
                        "but with more than one thread it also counts OpenMP spin-waiting")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def sample_ms(fn: Callable[[], object], n: int, clock: Callable[[], float]) -> float:
    """Mean time of ``n`` back-to-back calls of ``fn`` in milliseconds."""
    start = clock()
    for _ in range(n):
        fn()
    return (clock() - start) * 1e3 / n


def time_paths(paths: dict[str, Callable[[], object]], args) -> dict[str, list[float]]:
    """Per-repeat ms of each path over interleaved repeats (warm-up first; the order rotates
    every repeat). A repeat's samples run back to back, so their ratios shrug off a load burst
    that moves the medians apart."""
    clock = time.process_time if args.cpu_time else time.perf_counter
    for _ in range(args.warmup):
        for fn in paths.values():
            fn()
    once = max(max(sample_ms(fn, 1, clock) for fn in paths.values()), 1e-3)
    n = max(1, int(args.min_ms / once))
    times: dict[str, list[float]] = {name: [] for name in paths}
    order = list(paths.items())
    for r in range(args.repeats):
        shift = r % len(order)
        for name, fn in order[shift:] + order[:shift]:
            times[name].append(sample_ms(fn, n, clock))
    return times


def _ratio(times: dict[str, list[float]], a: str, b: str) -> float:
    return statistics.median(x / y for x, y in zip(times[a], times[b]))


def bench_model(name: str, batch_size: int, args) -> list[dict]:
    """One row per route of ``name``: MAdds, supernet_ms, dense_ms and their ratio."""
    model = timm.create_model(name).eval()
    with torch.no_grad():  # undo the zero-init of residual BNs, so every block does real work
        for m in model.modules():
            if isinstance(m, DSBatchNorm2d):
                m.weight.fill_(1.0)
    x = torch.randn(batch_size, *model.default_input_size)
    rows = []
    routes = [*range(model.num_subnets), "largest"]
    if args.subnets:
        routes = [s if s == "largest" else int(s) for s in args.subnets]
    for subnet in routes:
        dense = dsnet.extract_subnet(model, subnet).eval()
        module_model = copy.deepcopy(model)
        module_model.inference_plans = False
        with torch.inference_mode():
            times = time_paths({"supernet": lambda: model(x, subnet=subnet),
                                "module": lambda: module_model(x, subnet=subnet),
                                "dense": lambda: dense(x)}, args)
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append({"model": name, "batch_size": batch_size, "subnet": subnet,
                     "madds": dsnet.count_madds(model, subnet), "supernet_ms": med["supernet"],
                     "dense_ms": med["dense"], "ratio": _ratio(times, "supernet", "dense"),
                     "module_ms": med["module"], "module_ratio": _ratio(times, "module", "dense")})
        r = rows[-1]
        print(f"{name:>16} {batch_size:>5} {subnet!s:>8} {r['madds'] / 1e6:>10.1f} {r['supernet_ms']:>12.3f} "
              f"{r['dense_ms']:>10.3f} {r['ratio']:>7.3f} {r['module_ms']:>10.3f} {r['module_ratio']:>7.3f}",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # untrained weights drive activations subnormal: 100x slower
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, repeats {args.repeats}, "
          f"{'CPU' if args.cpu_time else 'wall'} time")
    print(f"{'model':>16} {'batch':>5} {'subnet':>8} {'MAdds (M)':>10} {'supernet_ms':>12} "
          f"{'dense_ms':>10} {'ratio':>7} {'module_ms':>10} {'ratio':>7}")
    rows = [r for name in args.models for b in args.batch_sizes for r in bench_model(name, b, args)]
    print("\nworst ratio per model and batch size (target <= %.2f)" % TARGET)
    worst = []
    for name in args.models:
        for b in args.batch_sizes:
            w = max((r for r in rows if r["model"] == name and r["batch_size"] == b),
                    key=lambda r: r["ratio"])
            worst.append({"model": name, "batch_size": b, "subnet": w["subnet"], "ratio": w["ratio"]})
            flag = "ok" if w["ratio"] <= TARGET else "OVER"
            print(f"{name:>16} {b:>5}  subnet {w['subnet']!s:>8}  ratio {w['ratio']:.3f}  {flag}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(),
                       "clock": "cpu" if args.cpu_time else "wall",
                       "repeats": args.repeats, "results": rows, "worst": worst}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
