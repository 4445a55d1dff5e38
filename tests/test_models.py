"""Supernets: extracted subnets equal supernet routes, costs match FlopCounterMode and the
published numbers, routes resolve and validate, the dynamic path equals per-sample static runs."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.models.blocks import GateUnit
from dsnet.models.spec import register
from dsnet.routes import RouteTable

MODEL_NAMES = ("ds_mobilenet_v1", "ds_resnet20", "ds_resnet56", "ds_resnet50")
TEST_SIZE = {"ds_mobilenet_v1": 64, "ds_resnet20": 32, "ds_resnet56": 32, "ds_resnet50": 64}
TEST_BATCH = {"ds_mobilenet_v1": 2, "ds_resnet20": 2, "ds_resnet56": 2, "ds_resnet50": 1}

# Published reference numbers (DESIGN.md; Li et al. 2021; torchvision's resnet50).
DS_MBNET_SUBNET_MADDS_M = (133, 153, 175, 200, 226, 255, 286, 319, 355, 393, 433, 475, 519, 565)
DS_MBNET_LARGEST_MADDS_M = 820
DS_MBNET_PARAMS_M = 7.68
RESNET50_PARAMS = 25_557_032


def _model(name: str, gen, randomize_bn, device, **kwargs) -> dsnet.DSNet:
    """A supernet in eval mode whose BN statistics differ per width (calibrated on noise)."""
    calib = torch.randn(4, 3, TEST_SIZE[name], TEST_SIZE[name], generator=gen)
    return randomize_bn(timm.create_model(name, **kwargs).to(device), gen, calib)


def _assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """assert_close with an absolute tolerance relative to the logits' scale: the supernet runs
    a strided 1x1 slice as a matrix product where the dense copy (or another batch size) runs a
    conv kernel, and float32 rounding through a deep random net differs by ~1e-5 of the scale.
    A wrong slice, row or route is off by the order of the scale."""
    scale = float(expected.abs().max())
    assert_close(actual, expected, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{what}: {m}")


def _input(gen, device, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=gen).to(device)


def _routes(model) -> list:
    return [*range(model.num_subnets), "largest"]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_extracted_subnets_equal_supernet_and_cost_what_is_counted(name, device, gen, randomize_bn):
    model = _model(name, gen, randomize_bn, device)
    size, batch = TEST_SIZE[name], TEST_BATCH[name]
    x = _input(gen, device, batch, size)
    storages = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    outputs = []
    for subnet in _routes(model):
        dense = dsnet.extract_subnet(model, subnet).eval()
        leaves = [m for m in dense.modules() if next(m.children(), None) is None]
        assert leaves and all(type(m).__module__.startswith("torch.nn.") for m in leaves), \
            sorted({type(m).__qualname__ for m in leaves})
        assert not storages & {p.untyped_storage().data_ptr() for p in dense.state_dict().values()}
        assert _num_params(dense) == dsnet.count_params(model, subnet)
        with torch.no_grad():
            with FlopCounterMode(display=False) as counter:
                y = dense(x)
            _assert_same(model(x, subnet=subnet), y, f"subnet {subnet}")
        madds = dsnet.count_madds(model, subnet, (3, size, size))
        flop_madds = counter.get_total_flops() / 2 / batch
        assert abs(madds - flop_madds) <= 0.01 * flop_madds, (subnet, madds, flop_madds)
        outputs.append(y)
    assert not torch.allclose(outputs[0], outputs[-2])  # the routes really differ
    assert not torch.allclose(outputs[-2], outputs[-1])


def test_ds_mobilenet_v1_matches_published_numbers():
    model = timm.create_model("ds_mobilenet_v1")
    size = (3, 224, 224)
    assert model.num_subnets == len(DS_MBNET_SUBNET_MADDS_M)
    for i, ref in enumerate(DS_MBNET_SUBNET_MADDS_M):
        assert dsnet.count_madds(model, i, size) == pytest.approx(ref * 1e6, rel=0.015), i
    assert dsnet.count_madds(model, "largest", size) == pytest.approx(DS_MBNET_LARGEST_MADDS_M * 1e6, rel=0.015)
    assert _num_params(model) == pytest.approx(DS_MBNET_PARAMS_M * 1e6, rel=0.02)
    assert dsnet.count_params(model, "largest") == pytest.approx(DS_MBNET_PARAMS_M * 1e6, rel=0.02)


def test_ds_resnet50_largest_route_is_torchvision_resnet50():
    x = torch.empty(1, 3, 224, 224, device="meta")
    with torch.device("meta"):
        tv = torchvision.models.resnet50()
        ours = timm.create_model("ds_resnet50").eval()
    with FlopCounterMode(display=False) as counter:
        tv(x)
    tv_madds = counter.get_total_flops() / 2
    assert dsnet.count_madds(ours, "largest", (3, 224, 224)) == pytest.approx(tv_madds, rel=0.01)
    with FlopCounterMode(display=False) as counter:
        ours(x)
    assert counter.get_total_flops() / 2 == pytest.approx(tv_madds, rel=0.01)
    tv_params = _num_params(tv)
    assert tv_params == RESNET50_PARAMS
    gate_params = sum(_num_params(u) for u in ours.units if isinstance(u, GateUnit))
    assert 0 < gate_params < 0.01 * tv_params
    assert _num_params(ours) - gate_params == tv_params
    assert dsnet.count_params(ours, "largest") == pytest.approx(tv_params, rel=0.01)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_madds_and_params_increase_over_subnets(name):
    model = timm.create_model(name)
    madds = [dsnet.count_madds(model, s) for s in _routes(model)]
    params = [dsnet.count_params(model, s) for s in _routes(model)]
    assert all(a < b for a, b in zip(madds, madds[1:])), madds
    assert all(a < b for a, b in zip(params, params[1:])), params


@pytest.mark.parametrize("name", ["ds_resnet20", "ds_resnet56"])
def test_cifar_resnets_span_quarter_to_full_width(name):
    model = timm.create_model(name)
    assert model.num_subnets == 4
    widths = [dsnet.extract_subnet(model, i).fc.in_features for i in range(4)]
    assert widths == [round(64 * m) for m in (0.25, 0.5, 0.75, 1.0)]
    assert model.default_input_size == (3, 32, 32)


# ---- routes ------------------------------------------------------------------------------

@pytest.mark.parametrize("name,n", [("ds_mobilenet_v1", 14), ("ds_resnet20", 4), ("ds_resnet56", 4),
                                    ("ds_resnet50", 4)])
def test_num_subnets(name, n):
    assert timm.create_model(name).num_subnets == n


def test_bad_subnet_is_a_clear_error(device, gen):
    model = timm.create_model("ds_resnet20").to(device).eval()
    x = _input(gen, device, 1, 32)
    for bad in (4, -5):
        with pytest.raises(ValueError, match=rf"subnet index {bad} is out of range.*4 static subnets \(0\.\.3\)"):
            model(x, subnet=bad)
    for bad in ("widest", (2, 0), (0,), (0, 4), (0, 1, 0)):
        with pytest.raises(ValueError, match=r"subnet must be an index in 0\.\.3, 'largest', 'dynamic'"):
            model(x, subnet=bad)


@torch.no_grad()
def test_route_tuples_select_the_same_subnets(device, gen, randomize_bn):
    model = _model("ds_resnet20", gen, randomize_bn, device)
    x = _input(gen, device, 2, 32)
    assert_close(model(x, subnet=(0, 2)), model(x, subnet=2))
    assert_close(model(x, subnet=(1, 3)), model(x, subnet="largest"))
    assert_close(model(x, subnet=[1, 3]), model(x))
    assert_close(model(x, subnet=-1), model(x, subnet=3))
    mixed = model(x, subnet=(1, 0))
    assert_close(mixed, dsnet.extract_subnet(model, (1, 0)).eval()(x))
    assert not torch.allclose(mixed, model(x, subnet=0))


def test_route_sampling_is_seeded_and_local():
    table = RouteTable((2, 14), (0, 1, 2, 3))
    state = torch.random.get_rng_state()
    a = table.sample(torch.Generator().manual_seed(5), 64)
    b = table.sample(torch.Generator().manual_seed(5), 64)
    c = table.sample(torch.Generator().manual_seed(6), 64)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert a == b and a != c
    assert {r[0] for r in a} == {0} and {r[1] for r in a} <= set(range(1, 14))
    assert len({r[1] for r in a}) > 5
    assert {r[1] for r in table.sample(torch.Generator().manual_seed(5), 64, low=0)} >= {0}
    assert RouteTable((2, 1), (0,)).sample(torch.Generator().manual_seed(0), 3) == [(0, 0)] * 3


@pytest.mark.parametrize("space", [(), (1, 0), (0, 0), (-1, 2), (0, 14)])
def test_routing_space_is_validated(space):
    with pytest.raises(ValueError, match=r"routing_space must be distinct, sorted subnet indices in 0\.\.13"):
        RouteTable((2, 14), space)


def test_model_routing_space_is_validated():
    with pytest.raises(ValueError, match="routing_space"):
        timm.create_model("ds_resnet20", routing_space=(0, 4))
    model = timm.create_model("ds_resnet20")
    with pytest.raises(ValueError, match="routing_space"):
        model.set_routing_space((2, 1))
    model.set_routing_space((1, 3))
    assert model.routing_space == (1, 3) and model.gate.width_head.out_features == 2


def _force_routes(model: dsnet.DSNet, x: torch.Tensor) -> torch.Tensor:
    """Set the width head so that samples spread over every route; returns the choice each
    sample must get. Route r wins where r thresholds lie below one hidden feature h_j:
    logit_r = r * h_j - (t_1 + ... + t_r), thresholds t between sorted values of h_j."""
    with torch.no_grad():
        feats = model.forward_units(x, model.routes.dynamic_routes[0], 0, model.gate_index)
        hidden = model.gate.squeeze(feats).flatten(1)
        j = int(hidden.std(0).argmax())
        h = hidden[:, j]
        n_routes, batch = len(model.routing_space), x.shape[0]
        ranked = h.sort().values
        cut = [(i * batch) // n_routes for i in range(1, n_routes)]
        thresholds = torch.stack([(ranked[c - 1] + ranked[c]) / 2 for c in cut])
        head = model.gate.width_head
        head.weight.zero_()
        head.weight[:, j] = torch.arange(n_routes, dtype=h.dtype)
        head.bias.copy_(-torch.cat([thresholds.new_zeros(1), thresholds.cumsum(0)]))
        return (h[:, None] > thresholds[None]).sum(1)


@pytest.mark.parametrize("name", ["ds_resnet20", "ds_mobilenet_v1"])
@torch.no_grad()
def test_dynamic_path_equals_per_sample_static_routes(name, device, gen, randomize_bn):
    batch = 8  # two samples per route
    model = _model(name, gen, randomize_bn, device, num_classes=7)
    x = _input(gen, device, batch, TEST_SIZE[name])
    expected_choice = _force_routes(model, x)
    assert len(set(expected_choice.tolist())) == len(model.routing_space) > 1
    logits = model(x, subnet="dynamic")
    assert logits.shape == (batch, 7)
    out = model.forward_dynamic(x)
    assert torch.equal(out.choice, expected_choice)
    assert out.gate_logits.shape == (batch, len(model.routing_space))
    assert_close(out.logits, logits)
    for i, c in enumerate(out.choice.tolist()):
        single = model(x[i:i + 1], subnet=model.routing_space[c])
        _assert_same(logits[i:i + 1], single, f"sample {i}, route {c}")
        _assert_same(model(x[i:i + 1], subnet="dynamic"), single, f"batch-1 sample {i}")


# ---- timm integration --------------------------------------------------------------------

@pytest.mark.parametrize("name", MODEL_NAMES)
@torch.no_grad()
def test_timm_create_model(name, device, gen):
    model = timm.create_model(name, num_classes=7).to(device).eval()
    assert model.get_classifier().out_features == 7
    assert model(_input(gen, device, 1, TEST_SIZE[name])).shape == (1, 7)
    with pytest.raises(ValueError, match="no pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_registering_a_taken_name_raises():
    def ds_resnet20():  # the name of an existing dsnet model
        raise AssertionError("never built")

    def resnet50():  # the name of a timm model
        raise AssertionError("never built")

    for fn in (ds_resnet20, resnet50):
        with pytest.raises(RuntimeError, match=f"'{fn.__name__}' is already registered"):
            register(fn)
    assert dsnet.MODELS["ds_resnet20"] is not ds_resnet20


def test_cifar_gate_can_sit_after_the_second_stage(device, gen, randomize_bn):
    """gate_stage=2: stage 2 joins the base group, the gate reads its output, every route still
    equals its extracted dense model and the dynamic path equals per-sample static routes."""
    model = _model("ds_resnet20", gen, randomize_bn, device, gate_stage=2)
    units = list(model.units)
    assert isinstance(units[model.gate_index], GateUnit) and model.gate_index == 7  # stem + 2 x 3 blocks
    assert all(u.group == 0 for u in units[1:7]) and all(u.group == 1 for u in units[8:])
    x = _input(gen, device, 3, 32)
    with torch.no_grad():
        for subnet in _routes(model):
            _assert_same(model(x, subnet=subnet), dsnet.extract_subnet(model, subnet).eval()(x), str(subnet))
    with pytest.raises(ValueError, match=r"gate_stage must be in 1\.\.2"):
        timm.create_model("ds_resnet20", gate_stage=3)


# ---- inference plans ---------------------------------------------------------------------

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
    model = _model(name, gen, randomize_bn, device)
    x = _input(gen, device, 2, TEST_SIZE[name])
    with torch.no_grad():
        _force_routes(model, x)
    with torch.inference_mode():
        _check_plans(model, x)
    with torch.inference_mode():  # a model made in inference mode runs too
        made_here = _model("ds_resnet20", gen, randomize_bn, device)
        assert torch.equal(made_here(x[:, :, :32, :32], subnet=0), _module_path(made_here, x[:, :, :32, :32], 0))


def _check_plans(model, x):
    for subnet in _routes(model):
        for batch in (x, x[:1]):
            planned = model(batch, subnet=subnet)
            assert torch.equal(planned, _module_path(model, batch, subnet)), subnet
    assert len(model._plans) == len(_routes(model))
    assert torch.equal(model(x, subnet="dynamic"), _module_path(model, x, "dynamic"))


@torch.no_grad()
def test_inference_plans_follow_weight_changes(device, gen, randomize_bn):
    """Plans hold views (in-place updates show through) and copies of strided kxk slices
    (renewed when the weight's version changes); load_state_dict and dtype moves rebuild them."""
    model = _model("ds_resnet20", gen, randomize_bn, device)
    x = _input(gen, device, 2, 32)
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
        other = _model("ds_resnet20", torch.Generator().manual_seed(seed), randomize_bn, device)
        model.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=assign)
        assert torch.equal(model(x, subnet=0), other(x, subnet=0))
    twin = copy.deepcopy(model)  # an EMA teacher is made this way, after plans exist
    assert model._plans and not twin._plans  # a copy's plans would close over our tensors
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
    model = _model("ds_resnet20", gen, randomize_bn, device)
    x = _input(gen, device, 4, 32)
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
    assert sum(k[0] == "gate" for k in model._plans) == 1  # the replaced head's plan is gone


@torch.no_grad()
def test_inference_plans_step_aside_for_hooks_training_and_autograd(device, gen, randomize_bn):
    model = _model("ds_resnet20", gen, randomize_bn, device)
    x = _input(gen, device, 2, 32)
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
        before, plans = len(seen), len(model._plans)
        model(x, subnet=1)
        model(x, subnet="dynamic")
        assert len(seen) == before and len(model._plans) == plans  # hooks gone: the plans run again
    with torch.enable_grad():
        x.requires_grad_(True)
        y = model(x, subnet=1)
        assert y.requires_grad  # autograd on: the module path records the graph
    model.train()
    counts = [m.num_batches_tracked.clone() for m in model.modules() if isinstance(m, dsnet.layers.DSBatchNorm2d)]
    model(x.detach(), subnet=1)
    after = [m.num_batches_tracked for m in model.modules() if isinstance(m, dsnet.layers.DSBatchNorm2d)]
    assert all(int((b - a).sum()) == 1 for a, b in zip(counts, after))  # training mode: BN updates
