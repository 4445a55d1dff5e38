"""What a DataLoader worker spends per image: the float path against the GPU input path.

Both paths decode the same JPEGs and draw the same crops, flips and RandAugment ops (the global
streams are seeded alike before each pass); they differ in how the image leaves the worker:

- ``float`` (``data.normalize_on=workers``): ToTensor (float32, /255), Normalize and, for
  training, random erasing in the worker;
- ``uint8`` (``data.normalize_on=device``): the uint8 tensor, as timm's ``use_prefetcher``; the
  device normalises and erases the batch (``dsnet.data.DeviceLoader``), not timed here.

The training transform is the ImageNet config's (``configs/imagenet_ds_mobilenet_v1.yml``):
RandomResizedCrop 224 (bicubic), flip, RandAugment ``rand-m9-mstd0.5``, random erasing 0.2; the
evaluation transform resizes to 256 and center-crops 224 (crop_pct 0.875). CIFAR-10's 32 x 32
JPEGs are upscaled to 224 by the crop, as ImageNet's larger images are downscaled. One thread
(a DataLoader worker runs torch single-threaded), ``--repeats`` interleaved rounds, each round
one pass of each path over the same ``--images`` images (alternating which goes first); reported:
median ms per image of each path, and the median of the per-round ratios.

Shared memory: a worker hands each batch to the main process through /dev/shm; the bytes of one
collated batch of ``--batch-size`` images at 224 px (``default_collate`` of float32 images
against timm's ``fast_collate`` of uint8 ones) are what each batch in flight holds there.

    python benchmarks/bench_loader.py --root /tmp/cifar --images 200 --repeats 5 --json loader.json
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data.loader import fast_collate
from torch.utils.data import default_collate

from dsnet.data import build_dataset, build_transforms

SIZE, AUGMENT, REPROB, INTERPOLATION, CROP_PCT = 224, "rand-m9-mstd0.5", 0.2, "bicubic", 0.875  # the ImageNet config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--root", default="/tmp/cifar", help="an ImageNet-layout folder (root/train/<class>/*.jpg)")
    p.add_argument("--images", type=int, default=200, help="images per pass, spread over the train split")
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (a DataLoader worker: 1)")
    p.add_argument("--batch-size", type=int, default=64, help="batch whose shared-memory bytes are reported")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p.parse_args(argv)


def datasets(root: str | Path, training: bool) -> dict[str, Any]:
    """The train split of ``root`` under the float path's and the uint8 path's transforms."""
    def build(uint8: bool) -> Any:
        tf = build_transforms(SIZE, training, auto_augment=AUGMENT if training else None,
                              reprob=REPROB if training else 0.0, interpolation=INTERPOLATION, crop_pct=CROP_PCT,
                              uint8=uint8)
        return build_dataset("folder", root, "train", tf)
    return {"float": build(False), "uint8": build(True)}


def _pass(dataset: Any, indices: list[int]) -> float:
    """ms per image of ``dataset[i]`` over ``indices``, the global streams seeded first."""
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    start = time.perf_counter()
    for i in indices:
        dataset[i]
    return (time.perf_counter() - start) * 1e3 / len(indices)


def time_paths(paths: dict[str, Any], indices: list[int], repeats: int) -> dict[str, list[float]]:
    """ms per image of each path, one pass per round over ``repeats`` rounds (order alternating),
    after one untimed pass each."""
    for dataset in paths.values():
        _pass(dataset, indices[: max(1, len(indices) // 10)])
    names, times = list(paths), {name: [] for name in paths}
    for r in range(repeats):
        for name in names if r % 2 == 0 else names[::-1]:
            times[name].append(_pass(paths[name], indices))
    return times


def batch_bytes(paths: dict[str, Any], batch_size: int) -> dict[str, int]:
    """Bytes of one collated batch of each path: what a worker puts in shared memory per batch."""
    n = len(paths["float"])
    items = {name: [ds[i % n] for i in range(batch_size)] for name, ds in paths.items()}
    return {"float": default_collate(items["float"])[0].nbytes, "uint8": fast_collate(items["uint8"])[0].nbytes}


def measure(root: str | Path, images: int, repeats: int, batch_size: int) -> dict:
    """The per-image rows (train and eval transforms) and the shared memory per batch."""
    rows = []
    for transform in ("train", "eval"):
        paths = datasets(root, transform == "train")
        n = len(paths["float"])
        indices = [round(k * (n - 1) / max(1, images - 1)) for k in range(min(images, n))]
        times = time_paths(paths, indices, repeats)
        ms = {name: statistics.median(t) for name, t in times.items()}
        rows.append({"transform": transform, "images": len(indices), "float_ms": ms["float"], "uint8_ms": ms["uint8"],
                     "ratio": statistics.median(f / u for f, u in zip(times["float"], times["uint8"])),
                     "samples_ms": times})
    shm = batch_bytes(datasets(root, True), batch_size)
    return {"root": str(root), "input_size": SIZE, "auto_augment": AUGMENT, "reprob": REPROB, "repeats": repeats,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, "batch_size": batch_size,
            "shm_bytes_per_batch": shm}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.root, args.images, args.repeats, args.batch_size)
    print(f"worker time per image, {result['input_size']} px, {result['threads']} thread(s), "
          f"{args.repeats} interleaved rounds, root {args.root}")
    print(f"{'transform':>9} {'images':>6} {'float ms':>9} {'uint8 ms':>9} {'float/uint8':>11}")
    for row in result["rows"]:
        print(f"{row['transform']:>9} {row['images']:>6} {row['float_ms']:>9.3f} {row['uint8_ms']:>9.3f} "
              f"{row['ratio']:>11.3f}")
    shm = result["shm_bytes_per_batch"]
    print(f"shared memory per batch of {args.batch_size}: float32 {shm['float'] / 2**20:.1f} MiB, "
          f"uint8 {shm['uint8'] / 2**20:.1f} MiB")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
