"""Sparse Structure Selection: factors on identity-shortcut blocks, the APG step on hand numbers and
inside an optimizer, removal of exactly the zero-factor blocks, and a shallower network equal to
the scaled original."""
import pytest
import torch
from torch.testing import assert_close

import dsnet
from dsnet.prune.arch import build_plain, removable_blocks
from dsnet.models.blocks import DenseBasicBlock
from dsnet.prune.sss import ScaledBlock, add_scales, apg_update, attach_apg, soft_threshold, sss_prune, zero_blocks
from tests.test_arch import small_bottleneck
from tests.test_baselines import SIZE, small_resnet, trained_large


def test_the_apg_step_on_hand_numbers_lands_exactly_on_zero():
    assert soft_threshold(torch.tensor([0.3, -0.3, 0.05]), 0.1).tolist() == pytest.approx([0.2, -0.2, 0.0])
    scale, velocity = torch.tensor(0.5), torch.tensor(0.0)
    apg_update(scale, torch.tensor(1.0), velocity, lr=0.1, momentum=0.9, gamma=1.0)
    # z = S(0.5 - 0.1, 0.1) = 0.3; v = 0.3 - 0.5 = -0.2; lambda = 0.3 + 0.9 v = 0.12
    assert float(velocity) == pytest.approx(-0.2) and float(scale) == pytest.approx(0.12)
    scale, velocity = torch.tensor(0.05), torch.tensor(0.0)
    apg_update(scale, torch.tensor(0.0), velocity, 0.1, 0.9, 1.0)  # z = 0; v = -0.05; lambda = -0.045
    assert float(scale) == pytest.approx(-0.045)
    apg_update(scale, torch.tensor(0.0), velocity, 0.1, 0.9, 1.0)  # z = 0 again: v = 0, lambda = 0 exactly
    assert float(scale) == 0.0 and float(velocity) == 0.0


def test_apg_updates_the_factors_and_the_optimizer_everything_else(gen):
    plain = dsnet.extract_subnet(small_resnet(), "largest").train()
    scales = add_scales(plain, small_resnet())
    assert [i for i, m in enumerate(plain.features) if isinstance(m, ScaledBlock)] == [1, 2, 3, 6, 7, 9, 10]
    opt = torch.optim.SGD([{"params": [p for p in plain.parameters() if p.dim() > 0], "lr": 0.1},
                           {"params": scales, "lr": 0.05}], momentum=0.9)
    attach_apg(opt, scales, gamma=0.5, momentum=0.9)
    plain(torch.randn(4, *SIZE, generator=gen)).square().mean().backward()
    grads = [s.grad.clone() for s in scales]
    conv = plain.features[0][0].weight
    conv_before, conv_grad = conv.detach().clone(), conv.grad.clone()
    opt.step()
    for s, g in zip(scales, grads):
        expected, velocity = torch.tensor(1.0), torch.tensor(0.0)
        apg_update(expected, g, velocity, 0.05, 0.9, 0.5)
        assert_close(s.detach(), expected) and assert_close(opt.state[s]["apg_velocity"], velocity)
        assert "momentum_buffer" not in opt.state[s]  # SGD never touched it
    assert_close(conv.detach(), conv_before - 0.1 * conv_grad)
    assert any(k == "apg_velocity" for st in opt.state_dict()["state"].values() for k in st)
    with pytest.raises(ValueError, match="must be parameters of the optimizer"):
        attach_apg(torch.optim.SGD([conv], lr=0.1), scales)


@pytest.mark.parametrize("factory", [small_resnet, small_bottleneck])
def test_sss_removes_exactly_the_zero_blocks_and_the_shallower_network_equals_the_original(gen, factory):
    supernet, large = trained_large(gen, factory)
    x = torch.randn(4, *SIZE, generator=gen)
    scales = add_scales(large, supernet)
    removable = removable_blocks(supernet)
    zero = removable[::2]
    with torch.no_grad():
        for i, s in zip(removable, scales):
            s.fill_(0.0 if i in zero else float(torch.rand((), generator=gen) * 2 - 0.5))
    expected = large(x)
    assert zero_blocks(large) == zero
    arch, shallow = sss_prune(factory(), large)
    assert list(arch.removed) == zero
    assert len(shallow.features) == len(supernet.units) - len(zero)
    assert not any(isinstance(m, ScaledBlock) for m in shallow.modules())
    assert all(type(m) is type(b) for m, b in zip(shallow.features, [f for i, f in enumerate(large.features)
                                                                      if i not in zero]))
    assert_close(shallow.eval()(x), expected, rtol=1e-4, atol=1e-5)
    fresh = build_plain(factory(), arch)
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in shallow.state_dict().items()}


def test_a_strong_penalty_drives_factors_to_exact_zero_and_removes_their_blocks(gen):
    supernet = small_resnet()
    plain = dsnet.extract_subnet(supernet, "largest").train()
    scales = add_scales(plain, supernet)
    opt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    attach_apg(opt, scales, gamma=20.0)
    for _ in range(6):
        plain(torch.randn(4, *SIZE, generator=gen)).logsumexp(1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(float(s) == 0.0 for s in scales)
    arch, shallow = sss_prune(small_resnet(), plain)
    assert list(arch.removed) == removable_blocks(supernet)
    assert not any(isinstance(m, DenseBasicBlock) and isinstance(m.shortcut, torch.nn.Identity)
                   for m in shallow.features)
