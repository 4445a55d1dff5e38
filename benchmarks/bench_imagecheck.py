"""What finding unreadable images before a run costs (``dsnet.imagecheck``), against decoding them.

For the image folder ``ROOT/train``: the first check (nothing recorded yet: every file's first and
last bytes read), a second start (the record read, one ``stat`` per file), and a full decode of
``--decode-sample`` images with PIL (what the loader does), scaled to the whole folder. Records go to
a fresh temporary ``DSNET_CACHE_DIR``; the files are read once before timing, so every figure is
from the page cache (a cold disk adds its reads to the first check and to the decode alike).

    python benchmarks/bench_imagecheck.py /tmp/cifar --decode-sample 5000
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", help="an image folder with train/<class>/<image>")
    parser.add_argument("--decode-sample", type=int, default=5000, metavar="N", help="images decoded to time it")
    args = parser.parse_args()
    os.environ["DSNET_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsnet-cache-")
    from PIL import Image

    from dsnet.data import ImageFolderDataset
    from dsnet.imagecheck import unreadable

    data = ImageFolderDataset(os.path.join(args.root, "train"))
    paths = [path for path, _ in data.samples]
    for path in paths:  # into the page cache
        with open(path, "rb") as f:
            f.read()
    n = len(paths)
    start = time.perf_counter()
    bad = unreadable(data.root, paths)
    first = time.perf_counter() - start
    start = time.perf_counter()
    unreadable(data.root, paths)
    second = time.perf_counter() - start
    sample = paths[:: max(1, n // args.decode_sample)][: args.decode_sample]
    start = time.perf_counter()
    for path in sample:
        with Image.open(path) as img:
            img.convert("RGB")
    decode = (time.perf_counter() - start) / len(sample) * n
    per = 1e4 / n
    print(f"{n} images ({sum(os.path.getsize(p) for p in sample) / len(sample) / 1e3:.1f} kB on average), "
          f"{len(bad)} unreadable")
    print(f"first check   {first:8.2f} s  ({first * per:.3f} s per 10k images)")
    print(f"second start  {second:8.2f} s  ({second * per:.3f} s per 10k images)")
    print(f"full decode   {decode:8.2f} s  ({decode * per:.3f} s per 10k images, from {len(sample)} decoded)")
    print(f"first check / full decode {first / decode:.3f}; second start / full decode {second / decode:.4f}")


if __name__ == "__main__":
    main()
