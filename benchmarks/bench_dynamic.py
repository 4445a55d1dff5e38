"""Routed dynamic inference against masking (the published DS-Net approach) and the dense limit.

dsnet's dynamic model groups the samples of a batch by the route their gate picked and runs each
group on dense weight slices. The published DS-Net code instead runs every layer at the full width
of the layer (its whole weight) and zeroes, per sample, the channels beyond that sample's
width. ``MaskedDynamic`` is that approach on the same supernet weights (and, with
``full_width=False``, a stronger variant that masks only up to the routing space's widest route),
made exact: every batch
norm after the gate applies each sample's own width statistics through a per-sample scale and
shift that are zero beyond its width (one ``addcmul``, i.e. BN and mask fused, which is no slower
than DS-Net's BN followed by a mask multiply). ``tests/test_bench.py`` holds its outputs equal to
``model(x, subnet="dynamic")``, so the timing compares the same function.

All paths are timed in the same interleaved rounds (``dsnet.deploy.bench.time_interleaved``): dynamic,
masked, largest route and the pieces of the dense limit (dense gate + dense routes on the groups
the gate formed, summed). Models run at random init with a hand-set gate spreading samples over
the routes (``dsnet.deploy.bench.spread_gate``); ``--seed`` fixes the init, so runs route alike.

    OMP_NUM_THREADS=2 python benchmarks/bench_dynamic.py --models ds_resnet20 ds_mobilenet_v1 \
        --batch-sizes 1 32 --repeats 7 --json dynamic.json
"""
from __future__ import annotations

import argparse
import json
import time

import timm
import torch
from torch import Tensor, nn

import dsnet  # noqa: F401  (registers the models)
from dsnet.deploy.bench import bench_batch, bench_threads, spread_gate, time_interleaved
from dsnet.deploy.extract import extract_dynamic
from dsnet.layers import DSBatchNorm2d
from dsnet.models.blocks import ConvBNAct, Residual
from dsnet.models.net import DSNet


class MaskedDynamic(nn.Module):
    """Gated inference by masking: the units after the gate run at one width for the whole batch;
    each BN applies per-sample statistics zeroed beyond the sample's width.

    ``full_width=True`` (the published approach): every layer after the gate at its full supernet
    width, as the DS-Net release's dynamic mode convolves with the whole weight and then masks.
    ``full_width=False``: only as wide as the routing space's widest route, a stronger masking
    baseline than the published one (it knows which widths the gate can pick).

    Holds no weights of its own beyond the per-route BN scale/shift tables ([R, C, 1, 1] per BN),
    built once from the supernet (rebuild after changing its weights).
    """

    def __init__(self, model: DSNet, full_width: bool = True) -> None:
        super().__init__()
        self.model = model
        routes = model.routes
        self.widest = routes.static(model.num_subnets - 1) if full_width else routes.dynamic_routes[-1]
        self.ks = [k for _, _, k in model.route_walk(self.widest)]
        self.tables = self._bn_tables()

    @torch.no_grad()
    def _trace(self, route, bns: list[DSBatchNorm2d], h: Tensor) -> dict[DSBatchNorm2d, int]:
        """The input width of each BN after the gate along ``route``."""
        widths: dict[DSBatchNorm2d, int] = {}
        hooks = [b.register_forward_pre_hook(lambda mod, inp: widths.__setitem__(mod, inp[0].shape[1]))
                 for b in bns]
        try:
            self.model.forward_from_gate(h, route)
        finally:
            for hook in hooks:
                hook.remove()
        return widths

    @torch.no_grad()
    def _bn_tables(self) -> dict[DSBatchNorm2d, tuple[Tensor, Tensor]]:
        """Per BN after the gate: (scale, shift) [R, C, 1, 1] at the masked width C, route r's
        width statistics, zero beyond route r's width."""
        m, g = self.model, self.model.gate_index
        bns = [b for u in m.units[g + 1:] for b in u.modules() if isinstance(b, DSBatchNorm2d)]
        h = m.forward_gate(torch.zeros(1, *m.default_input_size, device=m.classifier.weight.device))[0]
        per_route = [self._trace(r, bns, h) for r in m.routes.dynamic_routes]
        masked = self._trace(self.widest, bns, h)
        tables = {}
        for b in bns:
            scale = b.weight.new_zeros(len(per_route), masked[b])
            shift = torch.zeros_like(scale)
            for r, widths in enumerate(per_route):
                c, k = widths[b], b.choice_index(widths[b])
                scale[r, :c] = b.weight[:c] / torch.sqrt(b.running_var[k, :c] + b.eps)
                shift[r, :c] = b.bias[:c] - b.running_mean[k, :c] * scale[r, :c]
            tables[b] = (scale[:, :, None, None].contiguous(), shift[:, :, None, None].contiguous())
        return tables

    def _conv_bn_act(self, unit: ConvBNAct, x: Tensor, k: int, affine: dict) -> Tensor:
        scale, shift = affine[unit.bn]
        return unit.act(torch.addcmul(shift, unit.conv(x, k), scale))

    def _unit(self, unit: nn.Module, x: Tensor, k: int, affine: dict) -> Tensor:
        if isinstance(unit, ConvBNAct):
            return self._conv_bn_act(unit, x, k, affine)
        if isinstance(unit, Residual):
            shortcut = self._conv_bn_act(unit.shortcut, x, k, affine) if unit.shortcut is not None else x
            for step in unit.body:
                x = self._conv_bn_act(step, x, k, affine)
            return torch.relu_(x + shortcut)
        return unit(x, k)  # width preserving (SE, pooling): zero channels stay zero

    def forward(self, x: Tensor) -> Tensor:
        """x: [B, C, H, W] -> logits [B, num_classes], each sample as the route its gate picks."""
        m = self.model
        h, gate_logits = m.forward_gate(x)
        choice = gate_logits.argmax(1)
        affine = {b: (s.index_select(0, choice), t.index_select(0, choice)) for b, (s, t) in self.tables.items()}
        for i in range(m.gate_index + 1, len(m.units)):
            h = self._unit(m.units[i], h, self.ks[i], affine)
        return m.forward_head(h, self.widest)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["ds_resnet20", "ds_mobilenet_v1"],
                   help="dsnet model names; each runs at its default input size")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 32])
    p.add_argument("--repeats", type=int, default=7, help="interleaved timed rounds")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per path first")
    p.add_argument("--min-ms", type=float, default=20.0, help="each timed sample loops about this long")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--cpu-time", action="store_true", help="time process CPU time instead of wall time: "
                   "steadier on a shared machine, meaningful with --threads 1")
    p.add_argument("--stream", type=int, default=8, metavar="N",
                   help="also time batch 1 as N single-image calls in a row (0: off)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (and so of the routing)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def _setup(name: str, n: int, args: argparse.Namespace) -> tuple[DSNet, tuple, Tensor, nn.Module, nn.Module]:
    """(model at seeded random init with a spread gate, input size, n images, masked, narrow masked)."""
    torch.manual_seed(args.seed)
    model = timm.create_model(name).eval()
    size = tuple(model.default_input_size)
    g = torch.Generator().manual_seed(0)
    spread_gate(model, torch.randn(64, *size, generator=g))
    x = torch.randn(n, *size, generator=g)
    return model, size, x, MaskedDynamic(model).eval(), MaskedDynamic(model, full_width=False).eval()


def bench_model(name: str, batch_size: int, args: argparse.Namespace) -> dict:
    model, size, x, masked, narrow = _setup(name, batch_size, args)
    row = bench_batch(model, x, size, args.repeats, subnets=False,
                      extra={"masked": lambda: masked(x), "masked_narrow": lambda: narrow(x)},
                      warmup=args.warmup, min_ms=args.min_ms,
                      clock=time.process_time if args.cpu_time else time.perf_counter)
    ms = {"dynamic": row["dynamic_ms"], "masked": row["extra_ms"]["masked"], "largest": row["largest_ms"],
          "masked_narrow": row["extra_ms"]["masked_narrow"], "dense_limit": row["dense_limit_ms"]}
    return _report(name, batch_size, ms, row["theoretical_speedup"], row["routing"])


@torch.inference_mode()
def bench_stream(name: str, n: int, args: argparse.Namespace) -> dict:
    """Batch 1 as a server sees it: ``n`` single-image calls in a row, so the routing mix of the
    images counts (one image takes one route; whether that is the widest is luck). Every path
    loops over the same images; times are per image. The dense limit runs, per image, the dense
    gate and the dense route the gate picked for it."""
    model, size, x, masked, narrow = _setup(name, n, args)
    xs = list(x.split(1))
    net = extract_dynamic(model)
    choices = [int(net.gate.forward_gate(net.pre(x))[1].argmax(1)) for x in xs]
    fns = {"dynamic": lambda: [model(x, subnet="dynamic") for x in xs],
           "masked": lambda: [masked(x) for x in xs], "masked_narrow": lambda: [narrow(x) for x in xs],
           "largest": lambda: [model(x) for x in xs],
           "dense_limit": lambda: [net.posts[c](net.gate.forward_gate(net.pre(x))[0]) for x, c in zip(xs, choices)]}
    ms = time_interleaved(fns, args.repeats, args.warmup, args.min_ms,
                          clock=time.process_time if args.cpu_time else time.perf_counter)
    ms = {k: v / n for k, v in ms.items()}
    costs = model.dynamic_costs(size)
    largest_madds = model.route_cost(model.routes.largest, size).madds
    theoretical = largest_madds / (sum(costs[c] for c in choices) / n)
    routing = torch.bincount(torch.tensor(choices), minlength=len(model.routing_space)).tolist()
    return _report(name, 1, ms, theoretical, routing, stream=n)


def _report(name: str, batch_size: int, ms: dict[str, float], theoretical: float, routing: list[int],
            stream: int | None = None) -> dict:
    out = {"model": name, "batch_size": batch_size, "stream": stream, "dynamic_ms": ms["dynamic"],
           "masked_ms": ms["masked"], "masked_narrow_ms": ms["masked_narrow"],
           "dense_limit_ms": ms["dense_limit"], "largest_ms": ms["largest"],
           "theoretical_speedup": theoretical, "realized_speedup": ms["largest"] / ms["dynamic"],
           "dynamic_over_dense_limit": ms["dynamic"] / ms["dense_limit"],
           "masked_over_dynamic": ms["masked"] / ms["dynamic"],
           "masked_narrow_over_dynamic": ms["masked_narrow"] / ms["dynamic"], "routing": routing}
    label = f"1 x{stream}" if stream else str(batch_size)
    print(f"{name:>16} {label:>5} {out['dynamic_ms']:>10.3f} {out['masked_ms']:>10.3f} "
          f"{out['masked_narrow_ms']:>10.3f} "
          f"{out['dense_limit_ms']:>10.3f} {out['largest_ms']:>10.3f} {out['theoretical_speedup']:>7.2f} "
          f"{out['realized_speedup']:>7.2f} {out['dynamic_over_dense_limit']:>8.2f} "
          f"{out['masked_over_dynamic']:>8.2f} {out['masked_narrow_over_dynamic']:>8.2f}  {out['routing']}",
          flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with bench_threads(args.threads) as threads:
        print(f"torch {torch.__version__}, threads {threads}, repeats {args.repeats}, "
              f"{'CPU' if args.cpu_time else 'wall'} time, medians")
        print(f"{'model':>16} {'batch':>5} {'dynamic':>10} {'masked':>10} {'mask_nar':>10} {'dense_lim':>10} "
              f"{'largest':>10} {'theo x':>7} {'real x':>7} {'dyn/lim':>8} {'mask/dyn':>8} {'nar/dyn':>8}  routing")
        rows = [bench_model(name, b, args) for name in args.models for b in args.batch_sizes]
        if args.stream:
            rows += [bench_stream(name, args.stream, args) for name in args.models]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "threads": threads, "repeats": args.repeats,
                       "seed": args.seed, "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
