"""Network Slimming: the BN L1 subgradient, one global threshold on |gamma| (ties and empty spaces
on hand-made scores), the kept channels, and a pruned model equal to the original when the
dropped channels are dead."""
import pytest
import torch
from torch import nn
from torch.testing import assert_close

import dsnet
from dsnet.prune.arch import arch_cost, build_plain, named_spaces
from dsnet.errors import UserError
from dsnet.prune.slimming import add_bn_subgradient, attach_bn_subgradient, global_keep, slimming_prune
from tests.test_arch import tagged_mobilenet
from tests.test_baselines import SIZE, small_resnet, trained_large


def test_the_subgradient_adds_s_sign_gamma_to_every_bn_weight_inside_the_optimizer_step(gen):
    net = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 0.0]))
    net(torch.randn(4, 2, 2, 2, generator=gen)).sum().backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    attach_bn_subgradient(opt, net, 0.01)
    opt.step()
    push = {"1.weight": torch.tensor([0.01, -0.01, 0.0])}  # sign(0) = 0: a zero scale is left alone
    for n, p in net.named_parameters():
        assert_close(p.detach(), before[n] - 0.1 * (grads[n] + push.get(n, 0)), rtol=0, atol=1e-7)
    add_bn_subgradient(net, 1.0)  # the plain function, on the gradient as it is now
    now = torch.sign(net[1].weight.detach())  # the zero scale moved with its own gradient
    assert_close(net[1].weight.grad, grads["1.weight"] + push["1.weight"] + now)
    with pytest.raises(UserError, match=r"--slimming-sparsity must be a non-negative L1 strength"):
        attach_bn_subgradient(opt, net, -1.0)


def test_one_global_threshold_keeps_exactly_the_scores_above_it_ties_pruned_and_one_channel_per_space():
    scores = {"a": torch.tensor([0.1, 0.5, 0.3]), "b": torch.tensor([0.3, 0.05])}
    t, keep = global_keep(scores, 0.4)  # 2 of 5 go: t = 0.1, the second smallest
    assert t == pytest.approx(0.1) and keep["a"].tolist() == [1, 2] and keep["b"].tolist() == [0]
    t, keep = global_keep(scores, 0.6)  # 3 go: t = 0.3, and both channels tied at 0.3 go with it
    assert t == pytest.approx(0.3) and keep["a"].tolist() == [1]
    assert keep["b"].tolist() == [0]  # space b is left empty: it keeps its best channel
    t, keep = global_keep(scores, 0.0)
    assert t == float("-inf") and keep["a"].tolist() == [0, 1, 2] and keep["b"].tolist() == [0, 1]
    with pytest.raises(UserError, match=r"--ratio must be the fraction in \[0, 1\) of channels to prune, got 1.0"):
        global_keep(scores, 1.0)


def test_slimming_keeps_the_channels_whose_largest_gamma_over_the_space_is_above_the_threshold(gen):
    supernet, large = trained_large(gen)
    with torch.no_grad():  # signed scales; the streams' writers small, so that max and sum rank apart
        for m in large.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
        for m in [large.features[0], large.features[5].shortcut, large.features[8].shortcut,
                  *(large.features[i].body[1] for i in (1, 2, 3, 5, 6, 7, 8, 9, 10))]:
            m[1].weight.mul_(0.3)
    bn = lambda m: m[1].weight.detach().abs()  # noqa: E731  (a plain conv-bn-act's |gamma|)
    # stage one's stream: the stem's BN and the last BN of each of its three blocks
    stream = torch.stack([bn(large.features[0])] + [bn(large.features[i].body[1]) for i in (1, 2, 3)]).amax(0)
    inner = bn(large.features[1].body[0])  # a block's inner space: its own BN alone
    everything = torch.cat([s.amax(0) if s.dim() > 1 else s for s in _all_scores(large)])
    ratio = 0.5
    threshold = everything.sort().values[round(ratio * everything.numel()) - 1]
    arch, pruned = slimming_prune(small_resnet(), large, ratio)
    keep_stream, keep_inner = (stream > threshold).nonzero().flatten(), (inner > threshold).nonzero().flatten()
    assert arch.widths["units.0"] == len(keep_stream) and arch.widths["units.1.body.0"] == len(keep_inner)
    assert sum(arch.widths.values()) == everything.numel() - round(ratio * everything.numel())
    assert torch.equal(pruned.features[0][0].weight, large.features[0][0].weight[keep_stream])
    assert torch.equal(pruned.features[1].body[0][0].weight, large.features[1].body[0][0].weight[keep_inner][:, keep_stream])
    assert sum(p.numel() for p in pruned.parameters()) == arch_cost(small_resnet(), arch, SIZE).params


def _all_scores(large) -> list[torch.Tensor]:
    """Every channel space's |gamma| of ds_resnet20's largest route, written out by hand:
    a stream stacks its writers' BNs (stem or projection, then each block's last BN)."""
    f, scores = large.features, []
    bn = lambda m: m[1].weight.detach().abs()  # noqa: E731
    stages = [(0, [1, 2, 3], f[0]), (5, [5, 6, 7], f[5].shortcut), (8, [8, 9, 10], f[8].shortcut)]
    for _, blocks, first in stages:
        scores.append(torch.stack([bn(first)] + [bn(f[i].body[1]) for i in blocks]))
        scores += [bn(f[i].body[0]) for i in blocks]
    return scores


@pytest.mark.parametrize("factory", [small_resnet, tagged_mobilenet])
def test_a_slimmed_model_equals_the_original_when_the_dropped_channels_are_dead(gen, factory):
    """Zero gamma and beta of every BN on a random subset of each space's channels: those carry
    exact zeros (the stream's too, all its writers being zero), score 0 and go at the ratio of
    dead channels; the slimmed model computes what the full one does."""
    supernet, _ = trained_large(gen, factory)
    bns = [m for m in supernet.modules() if isinstance(m, dsnet.layers.DSBatchNorm2d)]
    dead_count = 0
    with torch.no_grad():
        for space in named_spaces(supernet).values():
            c = space.writers[0].shape[0]
            dead = torch.randperm(c, generator=gen)[: int(torch.randint(0, c, (), generator=gen))]
            dead_count += len(dead)
            for m in bns:
                if any(t is m.weight for t, _ in space.members):
                    m.weight[dead], m.bias[dead] = 0, 0
    large = dsnet.extract_subnet(supernet, "largest").eval()
    total = sum(s.writers[0].shape[0] for s in named_spaces(supernet).values())
    arch, pruned = slimming_prune(factory(), large, dead_count / total)
    assert sum(arch.widths.values()) == total - dead_count
    x = torch.randn(4, *SIZE, generator=gen)
    assert_close(pruned.eval()(x), large(x), rtol=1e-4, atol=1e-5)
    fresh = build_plain(factory(), arch)  # the architecture alone rebuilds the same shapes
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}
