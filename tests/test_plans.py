"""Inference plans (dsnet.models.plans): a route run as plain functions over cached slices returns the
module path's logits bit for bit, follows every way the weights change, and steps aside for hooks,
training and autograd."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.testing import assert_close

import dsnet
from dsnet.layers.fastpath import clear_slice_caches
from tests.test_models import MODEL_NAMES, TEST_SIZE, all_routes, force_routes, images, supernet


def _module_path(model, x, subnet):
    model.inference_plans = False
    try:
        return model(x, subnet=subnet)
    finally:
        model.inference_plans = True


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_inference_plans_equal_the_module_path_bit_for_bit(name, device, gen, randomize_bn):
    """A plan runs the same kernels on the same cached slices as the module path, minus the
    module calls: every route, the dynamic model, and batch 1 give identical logits."""
    model = supernet(name, gen, randomize_bn, device)
    x = images(gen, device, 2, TEST_SIZE[name])
    with torch.no_grad():
        force_routes(model, x)
    with torch.inference_mode():
        _check_plans(model, x)
    with torch.inference_mode():  # a model made in inference mode runs too
        made_here = supernet("ds_resnet20", gen, randomize_bn, device)
        assert torch.equal(made_here(x[:, :, :32, :32], subnet=0), _module_path(made_here, x[:, :, :32, :32], 0))


def _check_plans(model, x):
    for subnet in all_routes(model):
        for batch in (x, x[:1]):
            planned = model(batch, subnet=subnet)
            assert torch.equal(planned, _module_path(model, batch, subnet)), subnet
    assert len(model.plans.entries) == len(all_routes(model))
    assert torch.equal(model(x, subnet="dynamic"), _module_path(model, x, "dynamic"))


@torch.no_grad()
def test_inference_plans_follow_weight_changes(device, gen, randomize_bn):
    """Plans hold views (in-place updates show through) and copies of strided kxk slices
    (renewed when the weight's version changes); load_state_dict and dtype moves rebuild them."""
    model = supernet("ds_resnet20", gen, randomize_bn, device)
    x = images(gen, device, 2, 32)
    before = model(x, subnet=0)
    conv = model.units[2].body[0].conv  # a 3x3 conv whose subnet-0 slice is a cached copy
    conv.weight.mul_(1.5)
    model.units[2].body[0].bn.running_var.mul_(2.0)
    after = model(x, subnet=0)
    assert not torch.allclose(after, before)
    assert torch.equal(after, _module_path(model, x, 0))

    with torch.enable_grad():  # an optimizer step between two evaluations
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model(x, subnet=0).square().mean().backward()
        opt.step()
        model.eval()
    stepped = model(x, subnet=0)
    assert not torch.allclose(stepped, after)
    assert torch.equal(stepped, _module_path(model, x, 0))

    for seed, assign in ((1, True), (2, False)):  # new tensors, then copies into them
        other = supernet("ds_resnet20", torch.Generator().manual_seed(seed), randomize_bn, device)
        model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=assign)
        assert torch.equal(model(x, subnet=0), other(x, subnet=0))
    twin = copy.deepcopy(model)  # an EMA teacher is made this way, after plans exist
    assert model.plans.entries and not twin.plans.entries  # a copy's plans would close over our tensors
    twin.units[2].body[0].conv.weight.mul_(2.0)
    assert not torch.allclose(twin(x, subnet=0), model(x, subnet=0))
    assert torch.equal(twin(x, subnet=0), _module_path(twin, x, 0))
    model.double()
    assert model(x.double(), subnet=0).dtype == torch.float64
    assert_close(model(x.double(), subnet=0).float(), other(x, subnet=0))


@torch.no_grad()
def test_gate_plan_follows_the_width_head(device, gen, randomize_bn):
    """The gate's plan (units before it, attention and width head) reads the head in place, as
    stage two trains it, and is rebuilt when set_routing_space replaces the head."""
    model = supernet("ds_resnet20", gen, randomize_bn, device)
    x = images(gen, device, 4, 32)
    head = model.gate.width_head
    head.weight.copy_(torch.randn(head.weight.shape, generator=torch.Generator().manual_seed(3)).to(device))
    for _ in range(2):  # an in-place update between calls, as an optimizer step makes
        planned, logits = model.forward_gate(x)
        model.inference_plans = False
        module, module_logits = model.forward_gate(x)
        model.inference_plans = True
        assert torch.equal(planned, module) and torch.equal(logits, module_logits)
        head.bias.add_(torch.arange(head.out_features, device=device, dtype=head.bias.dtype))
    model.set_routing_space((0, 3))
    model.gate.width_head.bias.copy_(torch.tensor([0.0, 1.0], device=device))
    assert model.forward_gate(x)[1].shape == (4, 2)
    assert torch.equal(model.forward_dynamic(x).choice, torch.ones(4, dtype=torch.long, device=device))
    assert sum(k[0] == "gate" for k in model.plans.entries) == 1  # the replaced head's plan is gone


@torch.no_grad()
def test_inference_plans_step_aside_for_hooks_training_and_autograd(device, gen, randomize_bn):
    model = supernet("ds_resnet20", gen, randomize_bn, device)
    x = images(gen, device, 2, 32)
    seen = []
    model(x, subnet=1)
    model(x, subnet="dynamic")  # plans exist before the hooks come
    for register in (model.units[1].register_forward_hook, torch.nn.modules.module.register_module_forward_hook):
        hook = register(lambda m, i, o: seen.append(o.shape))
        before = len(seen)
        model(x, subnet=1)
        assert len(seen) > before  # the hook fired: no plan was used
        before = len(seen)
        model(x, subnet="dynamic")
        assert len(seen) > before
        hook.remove()
        before, plans = len(seen), len(model.plans.entries)
        model(x, subnet=1)
        model(x, subnet="dynamic")
        assert len(seen) == before and len(model.plans.entries) == plans  # hooks gone: the plans run again
    with torch.enable_grad():
        x.requires_grad_(True)
        y = model(x, subnet=1)
        assert y.requires_grad  # autograd on: the module path records the graph
    model.train()
    counts = [m.num_batches_tracked.clone() for m in model.modules() if isinstance(m, dsnet.layers.DSBatchNorm2d)]
    model(x.detach(), subnet=1)
    after = [m.num_batches_tracked for m in model.modules() if isinstance(m, dsnet.layers.DSBatchNorm2d)]
    assert all(int((b - a).sum()) == 1 for a, b in zip(counts, after))  # training mode: BN updates


@torch.no_grad()
def test_clear_slice_caches_drops_plans_after_a_data_edit(device, gen, randomize_bn):
    """An edit through ``.data`` bypasses the version counter, so a plan keeps its copy of a
    strided kxk slice; ``clear_slice_caches`` drops the plans with the slices."""
    model = supernet("ds_resnet20", gen, randomize_bn, device)
    x = images(gen, device, 2, 32)
    before = model(x, subnet=0)
    model.units[2].body[0].conv.weight.data.mul_(-1.0)  # held as a copy at subnet 0's width
    expected = dsnet.extract_subnet(model, 0).eval()(x)
    assert torch.equal(model(x, subnet=0), before)  # stale, as documented
    clear_slice_caches(model)
    assert_close(model(x, subnet=0), expected)
