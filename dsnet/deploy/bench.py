"""``dsnet bench``: what the gated model costs in milliseconds, against what its MAdds promise.

For each batch size it times, in eval mode under ``torch.inference_mode()`` with a fixed thread
count, after a warm-up and over interleaved repeats (every path once per repeat, rotating which
goes first; medians reported), per batch:

- the largest route ``model(x)`` and the dynamic model ``model(x, subnet="dynamic")``;
- every static subnet through the supernet (``model(x, subnet=i)``) and extracted dense
  (``extract_subnet(model, i)``);
- the dense limit: the dense pre-gate part + gate of ``extract_dynamic`` on the batch plus, for
  each group of samples the gate formed, that route's dense post-gate part on the group, summed.

The dynamic model's cost depends on the images, so it and the dense limit run over a mix of
``--images`` images (64 by default, spread evenly over the validation split, so every class is
in it) cut into batches of the batch size, and their times are per batch over the whole mix; the
static paths cost the same on any input and are timed on the mix's first batch. The reported
``dynamic_madds_mean`` is the mean over the images timed (``images`` in the row).

A static baseline checkpoint (``dsnet train-baseline``: a static subnet, an architecture, SSS's
scaled largest route) has no gate: its plain model is timed against the dense largest route of the
supernet it was cut from (``supernet.extract(supernet.routes.largest)``), interleaved the same way.

A checkpoint runs on batches of its run's validation images (random inputs if the data is not
there); a model name runs at random init with a hand-set gate that spreads samples over routes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import timm
import torch
from torch import Tensor, nn

from dsnet.config import check_root_used
from dsnet.deploy.extract import extract_dynamic, extract_subnet
from dsnet.errors import UserError
from dsnet.models import MODELS
from dsnet.models.net import DSNet
from dsnet.prune.static import load_static, static_cost
from dsnet.train.checkpoint import build_model, read_checkpoint
from dsnet.train.engine import checkpoint_run
from dsnet.train.logs import progress_bar
from dsnet.train.runs import build_val_loader

__all__ = ["bench_command", "bench_batch", "bench_static_batch", "StaticPair", "static_pair", "time_interleaved", "spread_gate", "dense_limit_fns",
           "gate_choice", "format_table"]

logger = logging.getLogger(__name__)


# ---- timing ----------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _sample_ms(fn: Callable[[], object], n: int, device: torch.device,
               clock: Callable[[], float] = time.perf_counter) -> float:
    """Mean time of ``n`` back-to-back calls of ``fn`` in milliseconds (wall time by default)."""
    _sync(device)
    start = clock()
    for _ in range(n):
        fn()
    _sync(device)
    return (clock() - start) * 1e3 / n


def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                     min_ms: float = 20.0, device: torch.device = torch.device("cpu"),
                     clock: Callable[[], float] = time.perf_counter, progress: str | None = None) -> dict[str, float]:
    """Median ms per call of each of ``fns`` over ``repeats`` interleaved rounds.

    Each function is warmed up, then calibrated to loop about ``min_ms`` per timed sample. Every
    round times each function once, starting at a rotating position, so drifts in clock speed or
    load from other jobs hit all paths alike. ``clock=time.process_time`` counts CPU time only
    (steadier on a shared machine; meaningful for one CPU thread). ``progress``: a progress bar
    over the rounds with this label (on stderr, when it is a terminal).
    """
    names = list(fns)
    loops = {}
    for name in names:
        for _ in range(warmup):
            fns[name]()
        loops[name] = max(1, int(min_ms / max(_sample_ms(fns[name], 1, device, clock), 1e-3)))
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in progress_bar(None, progress, bool(progress), iterable=range(max(1, repeats))):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(_sample_ms(fns[name], loops[name], device, clock))
    return {name: statistics.median(t) for name, t in times.items()}


# ---- the gate --------------------------------------------------------------------------------

@torch.inference_mode()
def spread_gate(model: DSNet, x: Tensor, seed: int = 3) -> None:
    """Hand-set the gate's width head so its argmax varies over ``x`` [N, C, H, W] (random init):
    random directions over the gate's hidden features, centred on their mean and scaled by their
    spread (as ``tests/test_sgs.py`` does)."""
    hidden = model.gate_features(x)[1].float()
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(model.gate.width_head.out_features, hidden.shape[1], generator=g).to(hidden)
    weight = weight / (hidden @ weight.T).std(0)[:, None].clamp_min(1e-6)
    model.gate.width_head.weight.copy_(weight)
    model.gate.width_head.bias.copy_(-(hidden.mean(0) @ weight.T))


def gate_choice(model: DSNet, x: Tensor) -> Tensor:
    """The route index [B] (routing-space order) the gate picks for each sample of x [B, C, H, W]."""
    return model.forward_gate(x)[1].argmax(1)


def dense_limit_fns(model: DSNet, x: Tensor) -> tuple[dict[str, Callable[[], object]], Tensor]:
    """The pieces of the dense limit on batch x under the deployment policy: ``{"gate": pre + gate,
    "route{r}": post r on its group}`` for every non-empty group (for the cascade: the slimmest
    post on the whole batch and the widest on the escalated samples), and the route index [B]
    each sample ends on."""
    net = extract_dynamic(model).to(x.device)
    h = net.gate.forward_gate(net.pre(x))[0]
    choice = net.routed(x)[1]
    fns: dict[str, Callable[[], object]] = {"gate": lambda: net.gate.forward_gate(net.pre(x))}
    cascade = net.cascade_threshold >= 0
    for r, post in enumerate(net.posts):
        group = h if cascade and r == 0 else h[choice == r]
        if group.shape[0] > 0:
            fns[f"route{r}"] = lambda post=post, group=group: post(group)
    return fns, choice


# ---- one batch -------------------------------------------------------------------------------

@torch.inference_mode()
def bench_batch(model: DSNet, x: Tensor | Sequence[Tensor], input_size: Sequence[int], repeats: int,
                subnets: bool = True, extra: dict[str, Callable[[], object]] | None = None, warmup: int = 2,
                min_ms: float = 20.0, clock: Callable[[], float] = time.perf_counter,
                progress: str | None = None) -> dict:
    """One ``results`` row of ``dsnet bench --json`` for a batch x [B, C, H, W], or a mix of
    batches of one size (model in eval mode): the dynamic model and the dense limit run over every
    batch (ms per batch, MAdds the mean over all images), the static paths on the first.

    ``extra`` paths (e.g. a masking baseline) are timed in the same interleaved rounds on the
    first batch; their medians are returned under ``row["extra_ms"]`` (absent when ``extra`` is
    None). ``progress``: a progress bar over the rounds, with this label.
    """
    xs = [x] if isinstance(x, Tensor) else list(x)
    first, device = xs[0], xs[0].device
    limits = [dense_limit_fns(model, b) for b in xs]
    choice = torch.cat([c for _, c in limits])
    fns: dict[str, Callable[[], object]] = {
        "largest": lambda: model(first), "dynamic": lambda: [model(b, subnet="dynamic") for b in xs],
        "limit": lambda: [f() for fs, _ in limits for f in fs.values()]}
    dense = {}
    if subnets:
        for i in range(model.num_subnets):
            dense[i] = extract_subnet(model, i).to(device).eval()
            fns[f"supernet/{i}"] = lambda i=i: model(first, subnet=i)
            fns[f"dense/{i}"] = lambda i=i: dense[i](first)
    fns.update({f"extra/{k}": f for k, f in (extra or {}).items()})
    ms = time_interleaved(fns, repeats, warmup, min_ms, device, clock, progress)
    dynamic_ms, limit_ms = ms["dynamic"] / len(xs), ms["limit"] / len(xs)
    costs = model.policy_costs(input_size)
    largest_madds = model.route_cost(model.routes.largest, input_size).madds
    dyn_madds = sum(costs[c] for c in choice.tolist()) / len(choice)
    row = {"batch_size": int(first.shape[0]), "images": len(choice), "largest_ms": ms["largest"],
           "dynamic_ms": dynamic_ms, "largest_madds": largest_madds, "dynamic_madds_mean": dyn_madds,
           "theoretical_speedup": largest_madds / dyn_madds,
           "realized_speedup": ms["largest"] / dynamic_ms, "dense_limit_ms": limit_ms,
           "subnets": [{"subnet": i, "madds": model.route_cost(model.routes.static(i), input_size).madds,
                        "supernet_ms": ms[f"supernet/{i}"], "dense_ms": ms[f"dense/{i}"]} for i in dense]}
    if extra is not None:
        row["extra_ms"] = {k: ms[f"extra/{k}"] for k in extra}
    row["routing"] = torch.bincount(choice, minlength=len(model.routing_space)).tolist()
    return row


@torch.inference_mode()
def bench_static_batch(pair: StaticPair, x: Tensor, repeats: int, warmup: int = 2, min_ms: float = 20.0,
                       clock: Callable[[], float] = time.perf_counter) -> dict:
    """One ``results`` row of ``dsnet bench --json`` for a static checkpoint on batch x [B, C, H, W]:
    its plain model against the dense largest route of its supernet, timed interleaved."""
    ms = time_interleaved({"static": lambda: pair.model(x), "largest": lambda: pair.largest(x)}, repeats, warmup,
                          min_ms, x.device, clock)
    return {"batch_size": int(x.shape[0]), "static_ms": ms["static"], "largest_ms": ms["largest"],
            "static_madds": pair.madds, "largest_madds": pair.largest_madds,
            "theoretical_speedup": pair.largest_madds / pair.madds, "realized_speedup": ms["largest"] / ms["static"]}


# ---- inputs ----------------------------------------------------------------------------------

def _random_inputs(n: int, input_size: Sequence[int], device: torch.device) -> Tensor:
    return torch.randn(n, *input_size, generator=torch.Generator().manual_seed(0)).to(device)


def _val_images(cfg, runtime, n: int) -> Tensor:
    """``n`` validation images of the run's data, spread evenly over the split (images
    ``i * len / n``), so that the mix holds every class of a split stored class by class; cycled
    if the split is smaller."""
    dataset = build_val_loader(cfg, runtime)[0].dataset
    have = len(dataset)
    if not have:
        raise UserError("the validation split is empty")
    if have < n:
        logger.warning("the validation split has %d images; cycling them to fill %d", have, n)
    picks = [i * have // n for i in range(n)] if have >= n else [i % have for i in range(n)]
    return torch.stack([dataset[i][0] for i in picks]).to(runtime.device)


@dataclass
class StaticPair:
    """A static baseline's plain model and the dense largest route of the supernet it was cut from
    (``supernet.extract(supernet.routes.largest)``), both in eval mode, with their MAdds at
    ``input_size`` (C, H, W)."""

    model: nn.Module
    largest: nn.Module
    madds: int
    largest_madds: int
    input_size: tuple[int, int, int]


def static_pair(state: dict, side: int, device: torch.device) -> StaticPair:
    """The ``StaticPair`` of a static checkpoint ``state`` at side x side inputs, on ``device``."""
    model, supernet = load_static(state)
    size = (supernet.in_chans, side, side)
    largest = supernet.extract(supernet.routes.largest).to(device).eval()
    return StaticPair(model.to(device).eval(), largest, static_cost(state, supernet, size).madds,
                      supernet.route_cost(supernet.routes.largest, size).madds, size)


def _load_target(target: str, n: int, overrides: Sequence[str] = ()
                 ) -> tuple[DSNet | StaticPair, Tensor, tuple[int, int, int], str]:
    """(model in eval mode, or a static checkpoint's ``StaticPair``; n inputs; input size; what the
    inputs are) for a checkpoint (its config with ``section.key=value`` ``overrides`` applied) or a
    model name."""
    if Path(target).exists():
        state = read_checkpoint(target, ("supernet", "gate", "static"))
        cfg, runtime = checkpoint_run(state, overrides)
        check_root_used(cfg, None, overrides)
        side = cfg.data.input_size
        if state["stage"] == "static":
            model = static_pair(state, side, runtime.device)
            size = model.input_size
        else:
            model = build_model(state).to(runtime.device).eval()
            size = (model.in_chans, side, side)
        if state["stage"] == "supernet":
            logger.warning("%s is a stage-one checkpoint: its gate is untrained and may send every "
                           "sample along one route; bench a train_gate.py checkpoint", target)
        try:
            return model, _val_images(cfg, runtime, n), size, f"validation images of {cfg.data.name}"
        except (OSError, ValueError, RuntimeError) as err:
            logger.warning("validation data unavailable (%s); timing on random inputs instead", err)
            return model, _random_inputs(n, size, runtime.device), size, "random inputs (data unavailable)"
    if target not in MODELS:
        raise UserError(f"{target!r} is neither an existing checkpoint file nor a dsnet model name "
                         f"({', '.join(sorted(MODELS))})")
    if overrides:
        raise UserError(f"config overrides ({overrides[0]}, ...) apply to a checkpoint's config; {target} is a "
                        "model name, benched on random inputs on CPU")
    model = timm.create_model(target).eval()
    size = tuple(model.default_input_size)
    spread_gate(model, _random_inputs(max(n, 64), size, torch.device("cpu"))[-64:])
    return model, _random_inputs(n, size, torch.device("cpu")), size, "random inputs, hand-set gate"


@contextlib.contextmanager
def bench_threads(threads: int | None) -> Iterator[int]:
    """Fix torch's intra-op threads (None: keep) and flush denormals (untrained weights drive
    activations subnormal, 100x slower on CPU); both restored on exit."""
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise UserError(f"--threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_flush_denormal(False)
        torch.set_num_threads(before)


# ---- dsnet bench -----------------------------------------------------------------------------

def format_table(report: dict) -> str:
    """The readable form of a ``dsnet bench`` report."""
    lines = [f"device {report['device']}, {report['threads']} threads"]
    for row in report["results"]:
        if "static_ms" in row:
            lines += [f"\nbatch {row['batch_size']}: static model {row['static_ms']:.3f} ms, dense largest route "
                      f"{row['largest_ms']:.3f} ms",
                      f"  MAdds static {row['static_madds'] / 1e6:.2f} M, largest {row['largest_madds'] / 1e6:.2f} M; "
                      f"speedup theoretical {row['theoretical_speedup']:.2f}x, realized {row['realized_speedup']:.2f}x"]
            continue
        lines += [f"\nbatch {row['batch_size']}: largest {row['largest_ms']:.3f} ms, "
                  f"dynamic {row['dynamic_ms']:.3f} ms, dense limit {row['dense_limit_ms']:.3f} ms "
                  f"(per batch, dynamic over {row['images']} images)",
                  f"  MAdds largest {row['largest_madds'] / 1e6:.2f} M, "
                  f"dynamic mean {row['dynamic_madds_mean'] / 1e6:.2f} M (of the {row['images']} images timed); "
                  f"speedup theoretical {row['theoretical_speedup']:.2f}x, realized {row['realized_speedup']:.2f}x, "
                  f"dynamic / dense limit {row['dynamic_ms'] / row['dense_limit_ms']:.2f}",
                  f"  {'subnet':>6} {'MAdds (M)':>10} {'supernet_ms':>12} {'dense_ms':>10} {'ratio':>6}"]
        lines += [f"  {s['subnet']:>6} {s['madds'] / 1e6:>10.2f} {s['supernet_ms']:>12.3f} {s['dense_ms']:>10.3f} "
                  f"{s['supernet_ms'] / s['dense_ms']:>6.2f}" for s in row["subnets"]]
    return "\n".join(lines)


def bench_command(target: str, batch_sizes: list[int], json_path: str | None, repeats: int,
                  threads: int | None, warmup: int = 2, min_ms: float = 20.0, overrides: Sequence[str] = (),
                  images: int = 64, progress: bool = True) -> dict:
    """``dsnet bench``: latency of the largest route, the dynamic model, every static subnet
    (supernet and dense) and the dense limit, per batch size; prints a table, writes
    ``json_path`` if given, returns the ``dsnet bench --json`` dict. A static baseline
    checkpoint's rows time its plain model against the dense largest route instead
    (``bench_static_batch``).

    ``target`` is a checkpoint path (``overrides`` apply to its config: ``train.device``,
    ``data.root``, ...) or a dsnet model name. The dynamic model runs over a mix of ``images``
    images (at least the largest batch) in batches of each size; ``progress`` shows a bar per
    batch size on a terminal. Raises UserError naming a bad target, override, batch size,
    image, repeat or thread count.
    """
    if not batch_sizes or min(batch_sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {list(batch_sizes)}")
    if repeats < 1:
        raise UserError(f"--repeats must be >= 1, got {repeats}")
    if images < 1:
        raise UserError(f"--images must be >= 1, got {images}")
    with bench_threads(threads) as n_threads:
        model, pool, size, source = _load_target(target, max(images, *batch_sizes), overrides)
        print(f"dsnet bench {target}: {source}, input {'x'.join(map(str, size))}", flush=True)
        results = []
        for b in batch_sizes:
            label = f"bench batch {b}" if progress else None
            if isinstance(model, StaticPair):
                results.append(bench_static_batch(model, pool[:b], repeats, warmup, min_ms))
                continue
            mix = [pool[i:i + b] for i in range(0, max(len(pool) - b, 0) + 1, b)]
            row = bench_batch(model, mix, size, repeats, warmup=warmup, min_ms=min_ms, progress=label)
            routing = row.pop("routing")
            logger.info("batch %d: samples per route %s", b, routing)
            results.append(row)
    report = {"device": str(pool.device), "threads": n_threads, "results": results}
    print(format_table(report), flush=True)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(report, indent=2) + "\n")
    return report
