"""What does one IEB training step cost next to training the same subnets as plain dense models?

Both paths train the same sandwich of routes: the largest, ``--num-random`` random static subnets
(drawn once from a fixed-seed generator) and the slimmest.

- ``ieb``: ``IEBStep(model, model.routes, ema.module, "ensemble", ...)`` on the supernet (train
  mode, width head frozen as in ``train_supernet``), each subnet's ``loss.backward()`` as the
  loop's backward, then ``optimizer.step()``, ``zero_grad(set_to_none=True)`` and
  ``ema.update(model)`` (timm's ``ModelEmaV3``).
- ``dense``: per route, a plain model ``dsnet.extract_subnet(model, route)`` in train mode with
  its own optimizer: forward, cross-entropy, backward, step, ``zero_grad(set_to_none=True)``;
  plus the teacher forwards IEB makes (the dense extracted largest and random subnets of the EMA
  model, eval mode, ``no_grad``). Summed: what the sandwich would cost on ideal dense kernels.

Optimizers are ``dsnet.train.runs.build_optimizer`` (SGD with momentum, as ``train_supernet``). After
``--warmup`` calls of each path, ``--repeats`` rounds time one call of each, alternating which goes
first, at a fixed thread count. Reported: each path's median wall time, the ratio of the medians
(target ieb / dense <= 1.15) and the median of the per-round ratios, which cancels load changes
slower than a round. On a shared machine whose cores are all busy, two-thread ops wait for a
time slice and a step can take ten times longer; such rounds show as a large max / min spread,
and the script warns (repeat the run when the machine is quieter, or use ``--threads 1``).

Peak memory: one extra, untimed call of each path under ``torch.profiler.profile(
profile_memory=True)``. The profiler records every allocation and free of the CPU allocator with
its size and timestamp (the ``[memory]`` events of its kineto results); their running sum in time
order is the bytes of tensors allocated during the call and still alive, and its maximum is the
peak growth above what was alive before the call (weights, optimizer state and the EMA copy are
allocated earlier and not counted; gradients, activations and temporaries are). Unlike RSS, this
is exact and does not depend on the allocator returning memory to the OS.

    python benchmarks/bench_train_step.py --model ds_resnet20 --input-size 32 --batch-size 64
    python benchmarks/bench_train_step.py --model ds_mobilenet_v1 --input-size 128 --batch-size 16 \
        --channels-last --json step.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable

import timm
import torch
from torch import Tensor, nn
from torch.profiler import ProfilerActivity, profile

import dsnet
from dsnet.train.ieb import IEBStep
from dsnet.models.routes import Route
from dsnet.train.runs import build_optimizer

TARGET = 1.15
SEED = 0
LR, MOMENTUM, WEIGHT_DECAY = 0.01, 0.9, 5e-4  # low lr: the fixed random batch trains many times


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="ds_resnet20", help="a dsnet model name")
    p.add_argument("--input-size", type=int, default=32, help="square input side in pixels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-random", type=int, default=1, help="random subnets in the sandwich")
    p.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls per path first")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--channels-last", action="store_true", help="models and input in channels_last")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="also print each path's N costliest ops (torch.profiler, self CPU time)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def peak_bytes(fn: Callable[[], object]) -> int:
    """Peak growth of live CPU tensor bytes during ``fn()`` (profiler allocation events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Wall ms of one call of each of ``fns`` per round, over ``repeats`` rounds (order alternating)
    after ``warmup`` calls each. Not ``dsnet.deploy.bench.time_interleaved``: that keeps only medians, and
    the per-round ratio needs the samples."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    names, times = list(fns), {name: [] for name in fns}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append((time.perf_counter() - start) * 1e3)
    return times


def optimizer(module: nn.Module) -> torch.optim.Optimizer:
    return build_optimizer(module, "sgd", LR, WEIGHT_DECAY, MOMENTUM, nesterov=False)


def ieb_path(model: nn.Module, ema: timm.utils.ModelEmaV3, x: Tensor, y: Tensor,
             num_random: int) -> tuple[Callable[[], None], list[Route]]:
    """One IEB step + optimizer step + EMA update on batch x [B, C, H, W], y [B]; and its sandwich."""
    step = IEBStep(model, model.routes, ema.module, "ensemble", num_random,
                   nn.CrossEntropyLoss(label_smoothing=0.1))
    opt = optimizer(model)

    def run() -> None:
        step(x, y, torch.Generator().manual_seed(SEED), lambda loss: loss.backward())
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)

    return run, step.plan(torch.Generator().manual_seed(SEED))


def dense_path(model: nn.Module, ema: timm.utils.ModelEmaV3, plan: list[Route], x: Tensor, y: Tensor,
               memory_format: torch.memory_format) -> Callable[[], None]:
    """Dense twins of ``plan``: each trains one step; the EMA's dense largest + randoms run forward."""
    students = [dsnet.extract_subnet(model, r).train().to(memory_format=memory_format) for r in plan]
    teachers = [dsnet.extract_subnet(ema.module, r).eval().to(memory_format=memory_format) for r in plan[:-1]]
    opts = [optimizer(s) for s in students]
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)

    def run() -> None:
        with torch.no_grad():
            for teacher in teachers:
                teacher(x)
        for student, opt in zip(students, opts):
            criterion(student(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    return run


def top_ops(fn: Callable[[], object], n: int) -> str:
    """The ``n`` ops of ``fn()`` with the most self CPU time, as torch.profiler's table."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=n)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # before the first profile: no GPU-probe error lines
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # untrained weights drive activations subnormal: 100x slower
    torch.manual_seed(SEED)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    model = timm.create_model(args.model).train().to(memory_format=fmt)
    model.gate.width_head.requires_grad_(False)  # stage two trains it (as train_supernet)
    ema = timm.utils.ModelEmaV3(model, decay=0.997)
    x = torch.randn(args.batch_size, model.in_chans, args.input_size, args.input_size).contiguous(memory_format=fmt)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    ieb, plan = ieb_path(model, ema, x, y, args.num_random)
    dense = dense_path(model, ema, plan, x, y, fmt)
    samples = time_rounds({"ieb": ieb, "dense": dense}, args.repeats, args.warmup)
    ms = {name: statistics.median(t) for name, t in samples.items()}
    paired = statistics.median(a / b for a, b in zip(samples["ieb"], samples["dense"]))
    mem = {"ieb": peak_bytes(ieb), "dense": peak_bytes(dense)}
    result = {"model": args.model, "input_size": args.input_size, "batch_size": args.batch_size,
              "num_random": args.num_random, "channels_last": args.channels_last, "threads": torch.get_num_threads(),
              "repeats": args.repeats, "torch": torch.__version__, "sandwich": [list(r) for r in plan],
              "ieb_ms": ms["ieb"], "dense_ms": ms["dense"], "time_ratio": ms["ieb"] / ms["dense"],
              "paired_time_ratio": paired, "samples_ms": samples,
              "ieb_peak_bytes": mem["ieb"], "dense_peak_bytes": mem["dense"],
              "memory_ratio": mem["ieb"] / mem["dense"]}
    print(f"{args.model}, input {args.input_size}, batch {args.batch_size}, "
          f"{'channels_last' if args.channels_last else 'contiguous'}, threads {torch.get_num_threads()}, "
          f"sandwich {plan}")
    print(f"{'path':>6} {'median ms':>10} {'min ms':>9} {'max ms':>9} {'peak MiB':>9}")
    for name in ("ieb", "dense"):
        t = samples[name]
        print(f"{name:>6} {ms[name]:>10.2f} {min(t):>9.2f} {max(t):>9.2f} {mem[name] / 2**20:>9.2f}")
    flag = "ok" if result["time_ratio"] <= TARGET else "OVER"
    print(f" ratio {result['time_ratio']:>10.3f} {'':>19} {result['memory_ratio']:>9.3f}   "
          f"(time target <= {TARGET:.2f}: {flag}; per-round ratios, median: {paired:.3f})")
    if any(max(t) > 1.5 * min(t) for t in samples.values()):
        print("warning: times vary by more than 1.5x between rounds: other jobs load the machine")
    if args.profile:
        for name, fn in (("ieb", ieb), ("dense", dense)):
            print(f"\n{name}: top {args.profile} ops by self CPU time\n{top_ops(fn, args.profile)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
