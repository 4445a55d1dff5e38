"""What an evaluation counts: top-k hits per sample, and the batches and sums behind the counts.

As timm's ``accuracy`` (``timm/utils/metrics.py``), the counts stay on the device. Under DDP an
evaluation loader serves one rank's shard (``dsnet.data.ShardSampler``: every sample on exactly
one rank); ``sum_over_shards_`` sums the counts over the ranks before anything is divided.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from dsnet.data import ShardSampler
from dsnet.train.logs import progress_bar

__all__ = ["Autocast", "topk_hits", "topk_correct", "sharded", "sum_over_shards_", "device_batches", "Progress"]


def topk_hits(logits: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> list[Tensor]:
    """Per sample, whether its label is in the top-k, one [B] bool tensor per k; logits [B, K], y [B]."""
    k_max = min(max(ks), logits.shape[1])
    hit = logits.topk(k_max, dim=1).indices.eq(y[:, None])
    return [hit[:, :min(k, k_max)].any(1) for k in ks]


def topk_correct(logits: Tensor, y: Tensor, ks: Sequence[int] = (1, 5)) -> Tensor:
    """Counts of samples whose label is in the top-k, one per k; logits [B, K], y [B] -> [len(ks)]."""
    return torch.stack([hit.sum() for hit in topk_hits(logits, y, ks)])


Autocast = Callable[[], contextlib.AbstractContextManager]


def sharded(loader: Iterable) -> bool:
    """Whether ``loader`` serves one rank's shard of the evaluation set (DDP evaluation)."""
    return isinstance(getattr(loader, "sampler", None), ShardSampler)


def sum_over_shards_(loader: Iterable, *counts: Tensor) -> None:
    """Sum ``counts`` in place over the ranks when ``loader`` is one rank's shard (DDP evaluation)."""
    if sharded(loader):
        for t in counts:
            dist.all_reduce(t)


def device_batches(loader: Iterable, device: torch.device,
                   max_batches: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
    """(images, labels) of ``loader`` moved to ``device``, the first ``max_batches`` only when given."""
    for i, (x, y) in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class Progress:
    """``loader`` with a progress bar (tqdm, on stderr, labelled ``desc``) over each pass, when
    ``enabled`` (the config's ``train.progress`` on the main rank) and stderr is a terminal;
    otherwise the loader itself. Each iteration is a new pass with a new bar, so an evaluation
    that reads the loader twice shows two. Other attributes are the loader's (``sampler``: a
    sharded evaluation still sums over the ranks, ``sharded``)."""

    def __init__(self, loader: Iterable, desc: str, enabled: bool = True) -> None:
        self.loader, self.desc, self.enabled = loader, desc, enabled

    def __getattr__(self, name: str):
        if name == "loader":  # not set yet (a copy being built)
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator:
        total = len(self.loader) if hasattr(self.loader, "__len__") else None
        return iter(progress_bar(total, self.desc, self.enabled, iterable=self.loader))
