"""One command for a GPU box: what dsnet's training and inference get out of this device.

    python benchmarks/device_check.py                  # about 2-5 minutes on one GPU
    python benchmarks/device_check.py --smoke          # the same code on CPU, tiny sizes, seconds

Prints a table per section and writes them as JSON (``--json``, default device_check.json):

- ``train_step``: stage one's IEB step (``dsnet.train.ieb.IEBStep``: the sandwich of the largest,
  two random and the slimmest subnet, EMA-ensemble teacher, then the optimizer step and the EMA
  update) of ds_mobilenet_v1 at 224 px, batch 64, in images/s, for fp32 and bf16 autocast, NCHW
  and channels_last, each with and without a per-step host sync (the ``.tolist()`` of a
  finite-loss check on the step's losses). The arms run interleaved (``time_interleaved``).
- ``inference``: latency of the gated model (random init, gate spread over its routes by
  ``spread_gate``) at batch 1 and 64 under ``torch.inference_mode()``: the dynamic model, the
  largest and the slimmest static subnet, and the confidence cascade (slimmest, escalating about
  half of the images to the widest route). bf16 autocast and channels_last on CUDA, as training runs.
- ``loader``: DataLoader images/s per worker on JPEGs written to a temporary folder (500 x 375,
  as ImageNet's typical image), with the ImageNet config's training transform, for the CPU path
  (float32 batches normalised and erased in the workers, copied to the device) and the GPU input
  path (uint8 batches, normalised and erased on the device: ``data.normalize_on=device``).
- ``ddp``: one IEB step of a 1-rank DistributedDataParallel (nccl on CUDA, gloo on CPU),
  channels_last as the ImageNet config; its time, whether its loss is finite and the warnings
  DDP raised.

Times are medians of interleaved rounds, with ``torch.cuda.synchronize`` around every timed
sample on CUDA; cudnn.benchmark is on, as in training.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from dsnet.data import (DeviceTransforms, SyntheticImages, build_dataset, build_loader, build_transforms,
                        default_normalization)
from dsnet.deploy.bench import spread_gate, time_interleaved
from dsnet.models.policy import confidence
from dsnet.train.engine import autocast_factory
from dsnet.train.ieb import IEBStep
from dsnet.train.runs import build_optimizer

AUGMENT, REPROB, INTERPOLATION = "rand-m9-mstd0.5", 0.2, "bicubic"  # configs/imagenet_ds_mobilenet_v1.yml


@dataclass(frozen=True)
class Sizes:
    """How big and how long each section runs (``--smoke``: tiny)."""

    model: str = "ds_mobilenet_v1"
    input_size: int = 224
    batch_size: int = 64
    infer_batches: tuple[int, ...] = (1, 64)
    repeats: int = 5
    warmup: int = 3
    min_ms: float = 200.0
    loader_images: int = 256
    loader_workers: int = 2
    loader_batch: int = 32
    loader_repeats: int = 3
    jpeg_size: tuple[int, int] = (500, 375)


SMOKE = Sizes(model="ds_resnet20", input_size=32, batch_size=4, infer_batches=(1, 4), repeats=1, warmup=0, min_ms=0.0,
              loader_images=8, loader_workers=1, loader_batch=4, loader_repeats=1, jpeg_size=(80, 60))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="run every section on CPU at tiny sizes (seconds)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--workers", type=int, help="loader section: DataLoader workers (default 2)")
    p.add_argument("--json", default="device_check.json", metavar="FILE", help="where to write the results")
    return p.parse_args(argv)


def pick_device(name: str, smoke: bool) -> torch.device:
    """``--device`` as a torch.device with an index on CUDA (``--smoke``: cpu)."""
    if smoke:
        return torch.device("cpu")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {name}: no CUDA device is available (use cpu or auto)")
        device = torch.device("cuda", device.index if device.index is not None else torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def _model(name: str, device: torch.device, channels_last: bool) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(name).to(device)
    model.gate.width_head.requires_grad_(False)  # stage two trains it (as train_supernet, before any DDP wrap)
    return model.to(memory_format=torch.channels_last) if channels_last else model


def _batch(model: nn.Module, sizes: Sizes, n: int, device: torch.device, channels_last: bool) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, model.in_chans, sizes.input_size, sizes.input_size, generator=g).to(device)
    y = torch.randint(0, model.num_classes, (n,), generator=g).to(device)
    return (x.contiguous(memory_format=torch.channels_last) if channels_last else x), y


def _ieb(model: nn.Module, train_model: nn.Module, amp: str, device: torch.device
         ) -> tuple[IEBStep, torch.optim.Optimizer, timm.utils.ModelEmaV3]:
    """Stage one's step on ``train_model`` (``model`` or its DDP wrapper), its optimizer and EMA."""
    model.train()
    ema = timm.utils.ModelEmaV3(model, decay=0.997)
    autocast, _ = autocast_factory(amp, device)
    step = IEBStep(train_model, model.routes, ema.module, "ensemble", 2, nn.CrossEntropyLoss(label_smoothing=0.1),
                   autocast)
    return step, build_optimizer(model, "sgd", 0.001, 1e-4, 0.9, True), ema


def _train_fn(model: nn.Module, amp: str, x: Tensor, y: Tensor, host_sync: bool) -> Callable[[], None]:
    step, opt, ema = _ieb(model, model, amp, x.device)

    def run() -> None:
        out = step(x, y, torch.Generator().manual_seed(0), lambda loss: loss.backward())
        if host_sync:  # what a per-step finite-loss check costs
            torch.isfinite(torch.stack(list(out["losses"].values()))).tolist()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model)
    return run


def train_step_rows(sizes: Sizes, device: torch.device) -> list[dict]:
    """IEB step images/s: fp32 / bf16 x NCHW / channels_last x with / without a host sync."""
    fns, arms = {}, {}
    for channels_last in (False, True):
        model = _model(sizes.model, device, channels_last)
        x, y = _batch(model, sizes, sizes.batch_size, device, channels_last)
        for amp in ("none", "bf16"):
            for host_sync in (False, True):
                name = f"{'bf16' if amp == 'bf16' else 'fp32'}/{'cl' if channels_last else 'nchw'}/{int(host_sync)}"
                fns[name] = _train_fn(model, amp, x, y, host_sync)
                arms[name] = {"dtype": "bf16" if amp == "bf16" else "fp32", "channels_last": channels_last,
                              "host_sync": host_sync}
    ms = time_interleaved(fns, sizes.repeats, sizes.warmup, sizes.min_ms, device)
    return [{**arms[k], "ms": ms[k], "images_per_s": sizes.batch_size * 1e3 / ms[k]} for k in fns]


@torch.inference_mode()
def inference_rows(sizes: Sizes, device: torch.device) -> list[dict]:
    """ms per batch of the dynamic model, largest, slimmest and the cascade at each batch size."""
    cuda = device.type == "cuda"
    model = _model(sizes.model, device, cuda).eval()
    autocast = autocast_factory("bf16" if cuda else "none", device)[0]
    rows = []
    with autocast():
        x, _ = _batch(model, sizes, max(sizes.infer_batches), device, cuda)
        spread_gate(model, x)
        h = model.forward_gate(x)[0]
        margin = confidence(model.forward_from_gate(h, model.routes.dynamic_routes[0]))
        threshold = float(margin.median())  # about half of a batch escalates to the widest route
        for n in sizes.infer_batches:
            xb = x[:n]
            fns = {"dynamic": lambda: model(xb, subnet="dynamic"), "largest": lambda: model(xb),
                   "slimmest": lambda: model(xb, subnet=0), "cascade": lambda: model.forward_cascade(xb, threshold)}
            ms = time_interleaved(fns, sizes.repeats, sizes.warmup, sizes.min_ms, device)
            escalated = float((margin[:n] < threshold).float().mean())
            rows += [{"batch_size": n, "path": k, "ms": v, "escalated": escalated if k == "cascade" else None}
                     for k, v in ms.items()]
    return rows


def write_jpegs(root: Path, n: int, size: tuple[int, int]) -> None:
    """``n`` JPEGs of ``size`` in two classes under ``root/train``: synthetic images, upscaled."""
    images = SyntheticImages(n, num_classes=2, image_size=64, seed=0)
    for i in range(n):
        image, label = images[i]
        folder = root / "train" / f"class_{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image.resize(size).save(folder / f"{i}.jpg", quality=90)


def _loader_pass(root: Path, sizes: Sizes, device: torch.device, workers: int, on_device: bool) -> float:
    """Images/s of one pass, counted from the first batch (worker start-up excluded)."""
    tf = build_transforms(224, True, auto_augment=AUGMENT, reprob=REPROB, interpolation=INTERPOLATION, uint8=on_device)
    mean, std = default_normalization(224)
    loader = build_loader(build_dataset("folder", root, "train", tf), sizes.loader_batch, True, num_workers=workers,
                          pin_memory=device.type == "cuda",
                          on_device=DeviceTransforms(device, mean, std, REPROB) if on_device else None)
    count, start = 0, None
    for x, _ in loader:
        x = x.to(device, non_blocking=True)   # as the training loop does (a no-op on the GPU input path)
        if start is None:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            continue
        count += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return count / max(time.perf_counter() - start, 1e-9)


def loader_rows(sizes: Sizes, device: torch.device, workers: int) -> list[dict]:
    """Images/s per worker of the CPU path and the GPU input path, interleaved passes."""
    with tempfile.TemporaryDirectory() as tmp:
        write_jpegs(Path(tmp), sizes.loader_images, sizes.jpeg_size)
        rates: dict[str, list[float]] = {"workers": [], "device": []}
        for r in range(sizes.loader_repeats):
            for path in ("workers", "device") if r % 2 == 0 else ("device", "workers"):
                rates[path].append(_loader_pass(Path(tmp), sizes, device, workers, path == "device"))
    return [{"normalize_on": path, "workers": workers, "images_per_s": statistics.median(v),
             "images_per_s_per_worker": statistics.median(v) / workers} for path, v in rates.items()]


def ddp_row(sizes: Sizes, device: torch.device) -> dict:
    """One IEB step of a 1-rank DDP (nccl on CUDA, gloo on CPU) after one untimed step."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group(backend, init_method=f"file://{tmp}/store", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=120))
        try:
            model = _model(sizes.model, device, channels_last=True)
            train_model = DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
            step, opt, _ = _ieb(model, train_model, "bf16" if device.type == "cuda" else "none", device)
            x, y = _batch(model, sizes, sizes.batch_size, device, True)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                times, losses = [], {}
                for _ in range(2):
                    _sync(device)
                    start = time.perf_counter()
                    losses = step(x, y, torch.Generator().manual_seed(0), lambda loss: loss.backward())["losses"]
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    _sync(device)
                    times.append((time.perf_counter() - start) * 1e3)
            finite = all(math.isfinite(float(v)) for v in losses.values())
        finally:
            dist.destroy_process_group()
    messages = sorted({str(w.message).splitlines()[0][:160] for w in caught})
    return {"backend": backend, "world_size": 1, "step_ms": times[-1], "loss_finite": finite, "warnings": messages}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _print(result: dict) -> None:
    print(f"device: {result['device']}  torch {result['torch']}  model {result['model']} "
          f"{result['input_size']} px, batch {result['batch_size']}")
    print("\nIEB train step")
    print(f"{'dtype':>6} {'layout':>13} {'host sync':>9} {'ms':>9} {'images/s':>9}")
    for r in result["train_step"]:
        print(f"{r['dtype']:>6} {'channels_last' if r['channels_last'] else 'nchw':>13} "
              f"{'yes' if r['host_sync'] else 'no':>9} {r['ms']:>9.2f} {r['images_per_s']:>9.1f}")
    print("\ninference latency")
    print(f"{'batch':>5} {'path':>9} {'ms':>9}")
    for r in result["inference"]:
        note = f"  ({r['escalated']:.0%} escalated)" if r["escalated"] is not None else ""
        print(f"{r['batch_size']:>5} {r['path']:>9} {r['ms']:>9.3f}{note}")
    print("\nloader (224 px training transform, JPEGs)")
    print(f"{'normalize_on':>12} {'workers':>7} {'images/s':>9} {'per worker':>10}")
    for r in result["loader"]:
        print(f"{r['normalize_on']:>12} {r['workers']:>7} {r['images_per_s']:>9.1f} {r['images_per_s_per_worker']:>10.1f}")
    d = result["ddp"]
    print(f"\nDDP, 1 rank, {d['backend']}: step {d['step_ms']:.1f} ms, loss finite: {d['loss_finite']}, "
          f"warnings: {len(d['warnings'])}")
    for message in d["warnings"]:
        print(f"  {message}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SMOKE if args.smoke else Sizes()
    device = pick_device(args.device, args.smoke)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    torch.set_flush_denormal(True)  # CPU: untrained weights drive activations subnormal, 100x slower
    if args.smoke:
        torch.set_num_threads(1)    # on a busy machine two spinning threads make a step 30x slower
    workers = args.workers if args.workers is not None else sizes.loader_workers
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({platform.processor() or 'cpu'}, " \
        f"{torch.get_num_threads()} threads)"
    started = time.perf_counter()
    result = {"device": name, "torch": torch.__version__, "smoke": args.smoke, "model": sizes.model,
              "input_size": sizes.input_size, "batch_size": sizes.batch_size,
              "train_step": train_step_rows(sizes, device), "inference": inference_rows(sizes, device),
              "loader": loader_rows(sizes, device, workers), "ddp": ddp_row(sizes, device)}
    result["seconds"] = round(time.perf_counter() - started, 1)
    _print(result)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
