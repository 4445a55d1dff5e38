"""dsnet models and checkpoints under timm's conventions: data config, classifier reset,
features, timm's checkpoint loader (EMA weights) and safetensors export.

A suite across modules (data, models, checkpoint, safetensors export): each test holds dsnet
to one timm convention that a timm user relies on, wherever dsnet implements it."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config

import dsnet
from dsnet.train.checkpoint import read_checkpoint
from dsnet.cli import main as dsnet_main
from dsnet.config import load_config
from dsnet.data import CIFAR10_MEAN, CIFAR10_STD
from dsnet.train.stage_one import train_supernet
from tests.test_runs import TINY


@pytest.mark.parametrize("name, size, mean, std, interpolation, crop", [
    ("ds_resnet20", 32, CIFAR10_MEAN, CIFAR10_STD, "bilinear", 1.0),
    ("ds_resnet56", 32, CIFAR10_MEAN, CIFAR10_STD, "bilinear", 1.0),
    ("ds_resnet50", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bilinear", 0.875),
    ("ds_mobilenet_v1", 224, IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, "bicubic", 0.875),
])
def test_resolve_data_config_returns_what_dsnet_uses(name, size, mean, std, interpolation, crop):
    model = timm.create_model(name, num_classes=7)
    cfg = resolve_data_config({}, model=model)
    assert cfg == {"input_size": (3, size, size), "interpolation": interpolation, "mean": tuple(mean),
                   "std": tuple(std), "crop_pct": crop, "crop_mode": "center"}
    assert model.pretrained_cfg["num_classes"] == 7 and model.pretrained_cfg["classifier"] == "classifier"


def test_reset_classifier_and_forward_features_follow_timm():
    model = timm.create_model("ds_resnet20", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 8, 8)
    assert model.forward_features(x, subnet=0).shape == (2, 16, 8, 8)  # 0.25x of 64
    with torch.no_grad():
        before = model(x, subnet=1)
    model.reset_classifier(5)
    assert model.get_classifier().out_features == 5 and model.num_classes == 5
    assert model.model_kwargs["num_classes"] == 5 and model.pretrained_cfg["num_classes"] == 5
    with torch.no_grad():
        logits = model(x, subnet=1)
    assert logits.shape == (2, 5) and before.shape == (2, 10)
    torch.testing.assert_close(logits, model.classifier(model.forward_features(x, subnet=1).mean((2, 3))))
    assert model.route_cost(model.routes.resolve(1)).params == dsnet.count_params(timm.create_model(
        "ds_resnet20", num_classes=5), subnet=1)
    with pytest.raises(ValueError, match="num_classes"):
        model.reset_classifier(0)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    return train_supernet(load_config(None, [*TINY, f"output.dir={out}", "train.epochs=1",
                                             "train.recalibrate_bn=false"]))


def test_timm_load_checkpoint_loads_the_weights_dsnet_evaluates_not_the_ema(run):
    path = run / "checkpoints" / "last.pth"
    state = read_checkpoint(path)
    key = "units.0.conv.weight"
    assert not torch.equal(state["ema"][key], state["model"][key])
    for use_ema in (True, False):  # timm's default is use_ema=True: the EMA is under 'ema', which it does not read
        model = timm.create_model("ds_resnet20", **state["model_kwargs"])
        timm.models.load_checkpoint(model, str(path), use_ema=use_ema)
        torch.testing.assert_close(model.state_dict()[key], state["model"][key], rtol=0, atol=0)
    ema = dsnet.load_checkpoint(path, use_ema=True)
    torch.testing.assert_close(ema.state_dict()[key], state["ema"][key], rtol=0, atol=0)


def test_safetensors_export_of_a_subnet_and_of_the_supernet(run, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = run / "checkpoints" / "last.pth"
    model = dsnet.load_checkpoint(path)
    assert dsnet_main(["export", str(path), "--subnet", "1", "--format", "safetensors", "-o", str(tmp_path / "s1.safetensors")]) == 0
    dense = dsnet.extract_subnet(model, 1).eval()
    dense.load_state_dict(load_file(tmp_path / "s1.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(dense(x), model(x, subnet=1))
    assert dsnet_main(["export", str(path), "--dynamic", "--format", "safetensors", "-o", str(tmp_path / "all.safetensors")]) == 0
    with safe_open(tmp_path / "all.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["model_name"] == "ds_resnet20" and meta["subnet"] == "supernet"
    fresh = timm.create_model("ds_resnet20", **read_checkpoint(path)["model_kwargs"]).eval()
    fresh.load_state_dict(load_file(tmp_path / "all.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, subnet=2), model(x, subnet=2))
    assert dsnet_main(["export", str(path), "--dynamic", "--format", "safetensors", "-o", str(tmp_path / "all.safetensors")]) == 2
