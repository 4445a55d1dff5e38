"""Weight-level pruning: the global magnitude threshold, masks held through fine-tuning, sparse MAdds."""
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.prune.sparse import apply_masks, keep_masks, magnitude_masks, sparse_madds, weight_madds
from tests.test_baselines import SIZE, small_resnet


def tiny_net() -> nn.Sequential:
    """conv 2->3 (3x3, padding 1, no bias) on 2x4x4 -> flatten (48) -> linear 48->5."""
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(48, 5))


def test_the_global_threshold_keeps_exactly_the_largest_magnitudes_ties_in_module_order():
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([3.0, -1.0]).view(2, 1, 1, 1))
        net[2].weight.copy_(torch.tensor([[1.0, -2.0]]))
    masks = magnitude_masks(net, 0.5)  # |w| = 3, 1 | 1, 2: the two 1s go
    assert masks["0"].flatten().tolist() == [True, False] and masks["2"].flatten().tolist() == [False, True]
    masks = magnitude_masks(net, 0.25)  # one of the tied 1s goes: the later one (the linear layer's)
    assert masks["0"].flatten().tolist() == [True, True] and masks["2"].flatten().tolist() == [False, True]
    assert all(m.all() for m in magnitude_masks(net, 0.0).values())
    with pytest.raises(ValueError, match=r"--sparsity must be a fraction in \[0, 1\) of the weights to prune, got 1.0"):
        magnitude_masks(net, 1.0)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.9])
def test_random_weights_lose_exactly_the_asked_fraction_and_every_pruned_weight_is_smaller(gen, sparsity):
    net = dsnet.extract_subnet(small_resnet(), "largest")
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    masks = magnitude_masks(net, sparsity)
    weights = dict(net.named_modules())
    kept = torch.cat([weights[n].weight.abs()[m] for n, m in masks.items()])
    pruned = torch.cat([weights[n].weight.abs()[~m] for n, m in masks.items()])
    total = kept.numel() + pruned.numel()
    assert total == sum(m.weight.numel() for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))
    assert pruned.numel() == round(sparsity * total) and kept.min() >= pruned.max()
    apply_masks(net, masks)
    assert sum(int((weights[n].weight == 0).sum()) for n in masks) == pruned.numel()


def test_pruned_weights_and_their_momentum_stay_zero_through_finetuning(gen):
    net = tiny_net()
    masks = magnitude_masks(net, 0.6)
    apply_masks(net, masks)
    before = {n: net.get_submodule(n).weight.detach().clone() for n in masks}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2, nesterov=True)
    keep_masks(net, masks, opt)
    for _ in range(3):
        loss = net(torch.randn(4, 2, 4, 4, generator=gen)).square().mean()
        loss.backward()
        for n, m in masks.items():  # masked as computed: clipping and momentum never see them
            w = net.get_submodule(n).weight
            assert torch.count_nonzero(w.grad[~m]) == 0 and torch.count_nonzero(w.grad[m]) > 0
        opt.step()
        opt.zero_grad(set_to_none=True)
    net[0].weight.grad = torch.ones_like(net[0].weight)  # a gradient that bypassed autograd
    opt.step()
    for n, m in masks.items():
        w = net.get_submodule(n).weight
        assert torch.count_nonzero(w[~m]) == 0 and torch.count_nonzero(opt.state[w]["momentum_buffer"][~m]) == 0
        assert not torch.equal(w[m], before[n][m])  # the kept weights did train


def test_sparse_madds_count_non_zero_weights_times_output_positions():
    net = tiny_net()
    with torch.no_grad():
        net[0].weight.view(-1)[:10] = 0  # 10 of 54 conv weights; each serves 4x4 output positions
        net[2].weight.view(-1)[5:12] = 0  # 7 of 240 linear weights; each serves one
    assert weight_madds(net, (2, 4, 4)) == 44 * 16 + 233
    assert weight_madds(net, (2, 4, 4), nonzero=False) == 54 * 16 + 240
    assert sparse_madds(net, 10_000, (2, 4, 4)) == 10_000 - 10 * 16 - 7


@pytest.mark.parametrize("subnet", [0, "largest"])
def test_dense_weight_madds_match_torchs_flop_counter(subnet):
    """A model without zeros: its conv and linear MAdds are what FlopCounterMode counts (it
    counts those layers only), and its sparse MAdds are its dense ones."""
    net = dsnet.extract_subnet(small_resnet(), subnet).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, *SIZE))
    assert weight_madds(net, SIZE) == counter.get_total_flops() // 2
    assert sparse_madds(net, 123, SIZE) == 123
