"""Supernets: extracted subnets equal supernet routes, costs match FlopCounterMode and the
published numbers, routes resolve and validate, the dynamic path equals per-sample static runs."""
from __future__ import annotations


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
from dsnet.models.routes import RouteTable

MODEL_NAMES = ("ds_mobilenet_v1", "ds_resnet20", "ds_resnet56", "ds_resnet50")
TEST_SIZE = {"ds_mobilenet_v1": 64, "ds_resnet20": 32, "ds_resnet56": 32, "ds_resnet50": 64}
TEST_BATCH = {"ds_mobilenet_v1": 2, "ds_resnet20": 2, "ds_resnet56": 2, "ds_resnet50": 1}

# Published reference numbers (DESIGN.md; Li et al. 2021; torchvision's resnet50).
DS_MBNET_SUBNET_MADDS_M = (133, 153, 175, 200, 226, 255, 286, 319, 355, 393, 433, 475, 519, 565)
DS_MBNET_LARGEST_MADDS_M = 820
DS_MBNET_PARAMS_M = 7.68
RESNET50_PARAMS = 25_557_032


def supernet(name: str, gen, randomize_bn, device, **kwargs) -> dsnet.DSNet:
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


def images(gen, device, batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=gen).to(device)


def all_routes(model) -> list:
    return [*range(model.num_subnets), "largest"]


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_extracted_subnets_equal_supernet_and_cost_what_is_counted(name, device, gen, randomize_bn):
    model = supernet(name, gen, randomize_bn, device)
    size, batch = TEST_SIZE[name], TEST_BATCH[name]
    x = images(gen, device, batch, size)
    storages = {p.untyped_storage().data_ptr() for p in model.state_dict().values()}
    outputs = []
    for subnet in all_routes(model):
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
    madds = [dsnet.count_madds(model, s) for s in all_routes(model)]
    params = [dsnet.count_params(model, s) for s in all_routes(model)]
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
    x = images(gen, device, 1, 32)
    for bad in (4, -5):
        with pytest.raises(ValueError, match=rf"subnet index {bad} is out of range.*4 static subnets \(0\.\.3\)"):
            model(x, subnet=bad)
    for bad in ("widest", (2, 0), (0,), (0, 4), (0, 1, 0)):
        with pytest.raises(ValueError, match=r"subnet must be an index in 0\.\.3, 'largest', 'dynamic'"):
            model(x, subnet=bad)


@torch.no_grad()
def test_route_tuples_select_the_same_subnets(device, gen, randomize_bn):
    model = supernet("ds_resnet20", gen, randomize_bn, device)
    x = images(gen, device, 2, 32)
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


def force_routes(model: dsnet.DSNet, x: torch.Tensor) -> torch.Tensor:
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
    model = supernet(name, gen, randomize_bn, device, num_classes=7)
    x = images(gen, device, batch, TEST_SIZE[name])
    expected_choice = force_routes(model, x)
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
    assert model(images(gen, device, 1, TEST_SIZE[name])).shape == (1, 7)
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
    model = supernet("ds_resnet20", gen, randomize_bn, device, gate_stage=2)
    units = list(model.units)
    assert isinstance(units[model.gate_index], GateUnit) and model.gate_index == 7  # stem + 2 x 3 blocks
    assert all(u.group == 0 for u in units[1:7]) and all(u.group == 1 for u in units[8:])
    x = images(gen, device, 3, 32)
    with torch.no_grad():
        for subnet in all_routes(model):
            _assert_same(model(x, subnet=subnet), dsnet.extract_subnet(model, subnet).eval()(x), str(subnet))
    with pytest.raises(ValueError, match=r"gate_stage must be in 1\.\.2"):
        timm.create_model("ds_resnet20", gate_stage=3)


@pytest.mark.parametrize("name", ("ds_mobilenet_v1", "ds_resnet20"))
def test_route_walk_gives_each_units_input_width_and_choice(name, device, gen, randomize_bn):
    """route_walk's (unit, input width, choice) are what each unit receives when the model runs,
    from any start; width_at is the features' width."""
    model = supernet(name, gen, randomize_bn, device)
    seen = []
    hooks = [u.register_forward_pre_hook(lambda m, args: seen.append((m, args[0].shape[1], args[1])))
             for u in model.units]
    try:
        for subnet in (0, "largest"):
            route = model.routes.resolve(subnet)
            seen.clear()
            with torch.no_grad():
                features = model.forward_features(images(gen, device, 1, TEST_SIZE[name]), subnet)
            assert list(model.route_walk(route)) == seen
            g = model.gate_index
            assert list(model.route_walk(route, g, g + 3)) == seen[g:g + 3]
            assert model.width_at(route) == features.shape[1]
    finally:
        for h in hooks:
            h.remove()


def test_counting_and_extraction_refuse_the_dynamic_model():
    """The dynamic model has no one route: counting or extracting it names what to use instead."""
    model = timm.create_model("ds_resnet20")
    for fn in (dsnet.count_madds, dsnet.count_params, dsnet.extract_subnet):
        with pytest.raises(ValueError, match=r"depends on each input's route: use model\.dynamic_costs\(\)"):
            fn(model, "dynamic")
