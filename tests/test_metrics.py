"""``dsnet.train.metrics``: top-k hits and counts on hand-made logits, and the batches an evaluation reads."""
from __future__ import annotations

import torch

from dsnet.train.metrics import device_batches, sharded, sum_over_shards_, topk_correct, topk_hits


def test_topk_hits_and_counts_on_hand_made_logits():
    logits = torch.tensor([[0.1, 0.9, 0.0],   # top-1 class 1, top-2 {1, 0}
                           [0.8, 0.1, 0.3],   # top-1 class 0, top-2 {0, 2}
                           [0.2, 0.3, 0.5]])  # top-1 class 2, top-2 {2, 1}
    y = torch.tensor([1, 2, 0])
    top1, top2 = topk_hits(logits, y, ks=(1, 2))
    assert top1.tolist() == [True, False, False]
    assert top2.tolist() == [True, True, False]
    assert topk_correct(logits, y, ks=(1, 2)).tolist() == [1, 2]
    # k beyond the number of classes counts every sample
    assert topk_correct(logits, y, ks=(1, 5)).tolist() == [1, 3]


def test_an_unsharded_loader_keeps_its_counts_and_batches_stop_at_max_batches():
    loader = [(torch.full((2, 1), float(i)), torch.tensor([i, i])) for i in range(4)]
    assert not sharded(loader)
    counts = torch.tensor([3, 4])
    sum_over_shards_(loader, counts)  # no process group: nothing to sum, nothing changed
    assert counts.tolist() == [3, 4]
    got = list(device_batches(loader, torch.device("cpu"), max_batches=3))
    assert [int(y[0]) for _, y in got] == [0, 1, 2]
    assert len(list(device_batches(loader, torch.device("cpu")))) == 4


def test_a_progress_bar_passes_the_batches_and_the_shard_through(monkeypatch, capsys):
    import sys

    from torch.utils.data import DataLoader, TensorDataset

    from dsnet.data import ShardSampler
    from dsnet.train.metrics import Progress, sharded

    data = TensorDataset(torch.arange(10.0))
    loader = DataLoader(data, batch_size=3, sampler=ShardSampler(len(data), 0, 1))
    bar = Progress(loader, "evaluate", enabled=True)
    assert sharded(bar) and bar.sampler is loader.sampler and len(bar) == 4  # DDP evaluation still sums
    assert [b[0].tolist() for b in bar] == [b[0].tolist() for b in loader]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    list(bar)
    assert "evaluate:" in capsys.readouterr().err  # the bar (cleared at the end: leave=False)
    list(Progress(loader, "evaluate", enabled=False))
    assert capsys.readouterr().err == ""
