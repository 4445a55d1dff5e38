"""ThiNet and regression-based channel pruning: selection rules on hand-made Gram matrices, and
recovery of a planted solution in whole networks."""
import pytest
import torch
from torch import nn

import dsnet
from dsnet.prune import reconstruct
from dsnet.prune.channels import channel_spaces
from dsnet.prune.reconstruct import contribution_gram, lasso_select, reconstruct_prune, thinet_select
from tests.conftest import randomize_bn_
from tests.test_baselines import SIZE, small_mobilenet, small_resnet


def test_thinet_greedy_counts_the_cross_terms_of_the_channels_it_drops():
    # dropping 2 first (smallest energy); then dropping 0 *lowers* the error (they cancel), so 1 stays
    g = torch.tensor([[1.0, 0.0, -0.8], [0.0, 0.95, 0.0], [-0.8, 0.0, 0.9]], dtype=torch.float64)
    assert thinet_select(g, 1).tolist() == [1]
    assert thinet_select(g, 2).tolist() == [0, 1]
    assert thinet_select(g, 3).tolist() == [0, 1, 2]


def test_lasso_keeps_the_channels_whose_coefficients_survive_the_largest_penalty():
    # uncorrelated channels: b_c = max(0, 1 - lam / G_cc), so the largest G_cc survive longest
    g = torch.diag(torch.tensor([0.5, 4.0, 1.0, 3.0, 0.2], dtype=torch.float64))
    assert lasso_select(g, 2).tolist() == [1, 3]
    assert lasso_select(g, 3).tolist() == [1, 2, 3]
    # channel 2 alone reconstructs most of the output (it cancels channel 0): it survives
    g = torch.tensor([[1.0, 0.0, -0.9], [0.0, 0.3, 0.0], [-0.9, 0.0, 1.0]], dtype=torch.float64)
    assert lasso_select(g, 1).tolist() == [1]


def test_contribution_gram_equals_the_gram_of_explicit_per_channel_contributions(gen):
    w = torch.randn(5, 3, 4, generator=gen, dtype=torch.float64)
    p = torch.randn(7, 3, 4, generator=gen, dtype=torch.float64)  # 7 patches
    z = torch.einsum("ock,sck->soc", w, p).reshape(-1, 3)  # [samples x outputs, channels]
    flat = p.reshape(7, -1)
    torch.testing.assert_close(contribution_gram(w, flat.T @ flat), z.T @ z)


def plant(model, gen, subnet: int) -> list[list[int]]:
    """In every channel space keep a random subset S of ``space.width`` channels alive: the weights
    reading the others are zeroed, so the network's output depends on S only. Returns each S."""
    planted = []
    with torch.no_grad():
        for space in channel_spaces(model, subnet):
            s = torch.randperm(space.writers[0].shape[0], generator=gen)[:space.width].sort().values
            dead = torch.ones(space.writers[0].shape[0], dtype=torch.bool)
            dead[s] = False
            for tensor, dim in space.members:
                if dim == 1 and isinstance(tensor, nn.Parameter):
                    tensor[:, dead] = 0
            planted.append(s.tolist())
    return planted


@pytest.mark.parametrize("method", ["thinet", "regression"])
@pytest.mark.parametrize("factory", [small_resnet, small_mobilenet])
def test_reconstruction_recovers_a_planted_channel_subset_exactly(gen, monkeypatch, method, factory):
    model = factory()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    batches = [torch.randn(8, *SIZE, generator=gen) for _ in range(3)]
    subnet = 1
    planted = plant(model, gen, subnet)
    randomize_bn_(model, gen, torch.cat(batches))  # statistics of the planted network: no channel dead
    x = torch.randn(6, *SIZE, generator=gen)
    with torch.no_grad():
        expected = model(x)
    chosen = []
    select = {"thinet": "thinet_select", "regression": "lasso_select"}[method]
    original = getattr(reconstruct, select)
    monkeypatch.setattr(reconstruct, select, lambda g, w: chosen.append(original(g, w).tolist()) or
                        torch.tensor(chosen[-1]))
    pruned = reconstruct_prune(model, subnet, method, batches).eval()
    assert chosen == planted
    shape = {k: v.shape for k, v in dsnet.extract_subnet(factory(), subnet).state_dict().items()}
    assert {k: v.shape for k, v in pruned.state_dict().items()} == shape
    with torch.no_grad():
        torch.testing.assert_close(pruned(x), expected, rtol=1e-4, atol=1e-4)


def test_regression_refits_a_reader_when_a_dropped_channel_copies_a_kept_one(gen):
    """Channel 1 carries exactly channel 0's activations: dropping it and folding its reading
    weights into channel 0's loses nothing, which least squares finds and a plain drop does not."""
    w = torch.randn(4, 3, 1, generator=gen, dtype=torch.float64)
    p = torch.randn(50, 3, generator=gen, dtype=torch.float64)
    p[:, 1] = p[:, 0]
    moments = p.T @ p
    keep = torch.tensor([0, 2])
    new = reconstruct.least_squares_weights(w, moments, keep)
    folded = torch.stack([w[:, 0, 0] + w[:, 1, 0], w[:, 2, 0]], 1)
    torch.testing.assert_close(new[:, :, 0], folded)


def test_thinet_rescales_a_kept_channel_to_carry_a_dropped_copy_of_it(gen):
    """Channel 1 contributes exactly twice what channel 0 does: with 1 dropped, channel 0's
    least-squares scale is 3 and channel 2's stays 1."""
    z0, z2 = torch.randn(40, generator=gen, dtype=torch.float64), torch.randn(40, generator=gen, dtype=torch.float64)
    z = torch.stack([z0, 2 * z0, z2], 1)  # [samples, channels]
    torch.testing.assert_close(reconstruct.thinet_rescale(z.T @ z, torch.tensor([0, 2])),
                               torch.tensor([3.0, 1.0], dtype=torch.float64))


@pytest.mark.parametrize("method", ["thinet", "regression"])
def test_after_pruning_the_full_width_network_computes_the_pruned_one(gen, method):
    """Every dropped channel's reading weights are zeroed as its space is done, so each later
    space is calibrated on the pruned network: the full-width model then equals the pruned one."""
    model = small_mobilenet()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    batches = [torch.randn(8, *SIZE, generator=gen) for _ in range(2)]
    randomize_bn_(model, gen, torch.cat(batches))
    x = torch.randn(4, *SIZE, generator=gen)
    with torch.no_grad():
        before = model(x)
        pruned = reconstruct_prune(model, 0, method, batches).eval()
        torch.testing.assert_close(model(x), pruned(x), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(pruned(x), before, atol=1e-3)  # pruning did change the function
