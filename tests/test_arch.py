"""Arbitrary architectures: widths per channel space and removed blocks, the plain model, its exact
cost, the record through files and checkpoints, exports, and the errors of a bad file."""
import json

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.utils.flop_counter import FlopCounterMode

import dsnet
from dsnet.prune.arch import (Architecture, arch_cost, build_plain, full_architecture, load_arch_state,
                        load_architecture, named_spaces, removable_blocks, save_architecture, subnet_architecture)
from dsnet.train.checkpoint import read_checkpoint, save_checkpoint
from dsnet.errors import UserError
from dsnet.deploy.torchscript import save_torchscript
from dsnet.deploy.onnx_export import save_onnx
from dsnet.layers import SqueezeExciteDense
from dsnet.models.resnet import build_resnet, resnet_stages
from tests.test_baselines import SIZE, small_mobilenet, small_resnet, trained_large


def small_bottleneck():
    """A bottleneck ResNet with the ImageNet stem (7x7 stride 2, max pooling) at 32x32."""
    model = build_resnet((4, 8), resnet_stages((4, 8), (2, 2), (0.5, 1.0), (0.5, 1.0), expansion=4),
                         3, None, True, input_size=32).eval()
    model.model_name, model.model_kwargs = "bottleneck_test", {}
    return model


def tagged_mobilenet():
    """A small DS-MBNet (depthwise convs and squeeze-excite inside channel spaces), named."""
    model = small_mobilenet()
    model.model_name, model.model_kwargs = "mobilenet_test", {}
    return model


FACTORIES = {"resnet": small_resnet, "mobilenet": tagged_mobilenet, "bottleneck": small_bottleneck}


def random_architecture(supernet, gen) -> Architecture:
    """Random widths in 1..full for every space, about half the removable blocks removed."""
    removable = removable_blocks(supernet)
    removed = [i for i in removable if torch.rand((), generator=gen) < 0.5]
    full = full_architecture(supernet, removed)
    widths = {n: int(torch.randint(1, w + 1, (), generator=gen)) for n, w in full.widths.items()}
    return Architecture(full.model, full.model_kwargs, widths, tuple(removed))


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _pool_adds(plain: nn.Module, x: torch.Tensor) -> int:
    """One add per input element of every average pool (squeeze-excite and the head), per sample:
    what dsnet's MAdds count besides convs and linear layers (FlopCounterMode counts neither)."""
    sizes = []
    hooks = [m.register_forward_hook(lambda m, args, out: sizes.append(args[0][0].numel()))
             for m in plain.modules() if isinstance(m, SqueezeExciteDense)]
    hooks.append(plain.features.register_forward_hook(lambda m, args, out: sizes.append(out[0].numel())))
    with torch.no_grad():
        plain(x)
    for h in hooks:
        h.remove()
    return sum(sizes)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_arbitrary_architectures_cost_what_flop_counter_and_the_module_count(gen, name):
    supernet = FACTORIES[name]()
    x = torch.randn(2, *SIZE, generator=gen)
    for _ in range(3):
        arch = random_architecture(supernet, gen)
        plain = build_plain(supernet, arch).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            plain(x)
        cost = arch_cost(supernet, arch, SIZE)
        assert cost.madds == counter.get_total_flops() // 2 // 2 + _pool_adds(plain, x[:1]), arch
        assert cost.params == _params(plain), arch
        assert len(plain.features) == len(supernet.units) - len(arch.removed)


@pytest.mark.parametrize("name", list(FACTORIES))
def test_the_architecture_of_a_route_is_that_route(gen, name):
    supernet, _ = trained_large(gen, FACTORIES[name])
    x = torch.randn(2, *SIZE, generator=gen)
    full = build_plain(supernet, full_architecture(supernet)).eval()
    largest = dsnet.extract_subnet(supernet, "largest").eval()
    assert_close(full(x), largest(x), rtol=0, atol=0)
    assert arch_cost(supernet, full_architecture(supernet), SIZE) == supernet.route_cost(supernet.routes.largest, SIZE)
    for i in range(supernet.num_subnets):
        route = supernet.routes.static(i)
        arch = subnet_architecture(supernet, i)
        plain = build_plain(supernet, arch).eval()
        assert_close(plain(x), supernet.extract(route, largest_stats=True).eval()(x), rtol=0, atol=0)
        assert arch_cost(supernet, arch, SIZE) == supernet.route_cost(route, SIZE)


def test_kept_channels_are_the_ones_asked_for(gen):
    supernet, large = trained_large(gen)
    arch = full_architecture(supernet)
    stem_keep, inner_keep = torch.tensor([5, 0, 3]), torch.tensor([6, 2])
    widths = {**arch.widths, "units.0": 3, "units.1.body.0": 2}
    plain = build_plain(supernet, Architecture(arch.model, arch.model_kwargs, widths),
                        {"units.0": stem_keep, "units.1.body.0": inner_keep})
    assert torch.equal(plain.features[0][0].weight, large.features[0][0].weight[stem_keep])
    assert torch.equal(plain.features[0][1].running_var, large.features[0][1].running_var[stem_keep])
    assert torch.equal(plain.features[1].body[0][0].weight, large.features[1].body[0][0].weight[inner_keep][:, stem_keep])
    assert torch.equal(plain.features[2].body[0][0].weight[:, :, 1, 1], large.features[2].body[0][0].weight[:, stem_keep, 1, 1])


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")
def test_an_architecture_survives_save_load_checkpoint_and_export(gen, tmp_path):
    supernet, _ = trained_large(gen)
    arch = random_architecture(supernet, gen)
    again, rebuilt = load_architecture(save_architecture(arch, tmp_path / "arch.json"))
    assert again == Architecture.from_dict(json.loads(json.dumps(arch.to_dict())))
    assert again.widths == arch.widths and again.removed == arch.removed and again.model == "ds_resnet20"
    assert arch_cost(rebuilt, again, SIZE) == arch_cost(supernet, arch, SIZE)
    plain = build_plain(supernet, arch).eval()
    save_checkpoint({"stage": "static", "model_name": arch.model, "architecture": arch.to_dict(),
                     "model": plain.state_dict()}, tmp_path / "last.pth")
    loaded, _, loaded_arch = load_arch_state(read_checkpoint(tmp_path / "last.pth", "static"))
    x = torch.randn(3, *SIZE, generator=gen)
    with torch.no_grad():
        expected = plain(x)
        assert loaded_arch == arch
        assert_close(loaded(x), expected, rtol=0, atol=0)
        save_torchscript(loaded, tmp_path / "m.pt")
        assert_close(torch.jit.load(str(tmp_path / "m.pt"))(x), expected, rtol=1e-5, atol=1e-6)
    ort = pytest.importorskip("onnxruntime")
    save_onnx(loaded, x, tmp_path / "m.onnx", ["input"], ["logits"])
    got = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"input": x.numpy()})[0]
    assert_close(torch.from_numpy(got), expected, rtol=1e-4, atol=1e-5)


def _write(tmp_path, record) -> str:
    path = tmp_path / "arch.json"
    path.write_text(record if isinstance(record, str) else json.dumps(record))
    return str(path)


def _record(**change) -> dict:
    supernet = small_resnet()
    return {**full_architecture(supernet).to_dict(), **change}


@pytest.mark.parametrize("change,message", [
    ("{not json", r"is not JSON \(Expecting property name"),
    ({"format": "other"}, r"is not a dsnet architecture: expected a JSON object with \"format\": \"dsnet-architecture\""),
    ({"extra": 1}, r"has unknown keys \['extra'\] and lacks keys \[\]"),
    ({"version": 2}, r"has version 2; this dsnet reads versions up to 1"),
    ({"model": "resnet18"}, r"names model 'resnet18', which is not a dsnet model \(ds_mobilenet_v1"),
    ({"widths": {"units.0": 0}}, r"'widths' must map channel-space names to positive integers"),
    ({"removed_blocks": [1, 1]}, r"'removed_blocks' must be a list of distinct unit indices, got \[1, 1\]"),
    ({"removed_blocks": [5]}, r"units \[5\] of ds_resnet20 are not residual blocks with an identity shortcut; "
                              r"the removable blocks are \[1, 2, 3, 6, 7, 9, 10\]"),
    ({"removed_blocks": [2]}, r"ds_resnet20 with blocks \[2\] removed has the channel spaces \['units.0', "
                              r"'units.1.body.0', 'units.3.body.0', .*\]; unknown: \['units.2.body.0'\], missing: \[\]"),
])
def test_a_bad_static_arch_file_is_one_sentence_naming_the_file(tmp_path, change, message):
    path = _write(tmp_path, change if isinstance(change, str) else _record(**change))
    with pytest.raises(UserError, match=f"^--static-arch {path}(: | )" + message):
        load_architecture(path)


def test_static_arch_widths_must_name_the_spaces_and_fit_them(tmp_path):
    record = _record()
    widths = dict(record["widths"])
    with pytest.raises(UserError, match=r"channel space units.5.shortcut has 16 channels in ds_resnet20; its "
                                        r"width must be in 1..16, got 17"):
        load_architecture(_write(tmp_path, {**record, "widths": {**widths, "units.5.shortcut": 17}}))
    del widths["units.0"]
    with pytest.raises(UserError, match=r"has the channel spaces .*; unknown: \['units.99'\], missing: \['units.0'\]$"):
        load_architecture(_write(tmp_path, {**record, "widths": {**widths, "units.99": 3}}))
    with pytest.raises(UserError, match=r"^--static-arch \S+ does not exist$"):
        load_architecture(tmp_path / "absent.json")


def test_space_names_follow_the_first_writer():
    spaces = named_spaces(small_resnet())
    assert list(spaces)[:3] == ["units.0", "units.1.body.0", "units.2.body.0"]
    assert "units.5.shortcut" in spaces and "units.5.body.0" in spaces  # stage two's stream and inner space
    assert len(spaces["units.0"].writers) == 4  # the stem and the three blocks adding into the stream
