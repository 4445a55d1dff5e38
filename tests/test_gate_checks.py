"""Stage two refuses what it cannot deliver before any work (``stage_two.check_target_madds``): a
``--target-madds`` outside the MAdds the shipped policy can reach on the supernet's routing space,
or one that no held-back images would choose; one sentence, exit 2, nothing written. And the
images stage two holds back to choose what ships are never among those the gate trains on."""
import pytest
import timm
from PIL import Image

from dsnet.cli import main as dsnet_main
from dsnet.config import config_to_dict, config_yaml, load_config
from dsnet.train import stage_two
from dsnet.train.checkpoint import save_checkpoint
from dsnet.train.stage_one import train_supernet
from tests.test_runs import TINY

KWARGS = {"base_mults": [0.25, 0.5], "width_mults": [0.125, 0.25, 0.5]}


@pytest.fixture
def supernet(tmp_path):
    """(a stage-one checkpoint of TINY's supernet, untrained; the config file)."""
    cfg = load_config(None, TINY)
    model = timm.create_model("ds_resnet20", num_classes=4, **KWARGS)
    path = save_checkpoint({"stage": "supernet", "model_name": "ds_resnet20",
                            "model_kwargs": dict(model.model_kwargs), "model": model.state_dict(),
                            "config": config_to_dict(cfg), "classes": [f"class_{i}" for i in range(4)],
                            "bn_recalibrated": True}, tmp_path / "supernet.pth")
    config = tmp_path / "tiny.yml"
    config.write_text(config_yaml(cfg))
    return path, config, model


@pytest.mark.parametrize("deploy", ["gate", "cascade"])
def test_a_target_outside_the_reachable_madds_stops_train_gate_before_any_work(supernet, tmp_path, capsys, deploy):
    path, config, model = supernet
    costs = model.dynamic_costs((3, 32, 32))  # routing space 0, 1, 2 of the three subnets
    wide = model.route_cost(model.routes.dynamic_routes[-1], (3, 32, 32)).madds
    high = max(costs) if deploy == "gate" else costs[0] + wide - model.shared_cost((3, 32, 32))
    out = tmp_path / "gate"
    code = dsnet_main(["train-gate", "-c", str(config), "--supernet", str(path), "--target-madds", "50M",
                       f"gate.deploy={deploy}", f"output.dir={out}"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        f"dsnet train-gate: error: gate.target_madds (--target-madds) 50.00 M is outside what the {deploy} of this "
        f"supernet can reach at 32x32 px over gate.routing_space [0, 1, 2]: {costs[0] / 1e6:.2f} M to "
        f"{high / 1e6:.2f} M MAdds")
    assert 0 < costs[0] < high < 50e6
    low_target = f"{costs[0] / 2e6:.2f}M"
    assert dsnet_main(["train-gate", "-c", str(config), "--supernet", str(path), "--target-madds", low_target,
                       f"gate.deploy={deploy}", f"output.dir={out}"]) == 2 and not out.exists()
    assert "is outside what the" in capsys.readouterr().err


def test_a_target_without_held_back_images_is_refused(supernet, tmp_path, capsys):
    path, config, model = supernet
    out = tmp_path / "gate"
    code = dsnet_main(["train-gate", "-c", str(config), "--supernet", str(path), "--target-madds", "3M",
                       "gate.holdout=0", f"output.dir={out}"])
    assert code == 2 and not out.exists()
    assert capsys.readouterr().err.strip() == (
        "dsnet train-gate: error: gate.target_madds (--target-madds) 3.00 M is chosen on the held-back training "
        "images, but gate.holdout is 0; set gate.holdout (e.g. 0.1) or drop the target")


def _numbered_folder(root, count=40):
    """``count`` 32x32 images of one grey level each (10 + 5 i: image i), in four classes, and a val split."""
    for split, n in (("train", count), ("val", 8)):
        for i in range(n):
            path = root / split / f"c{i % 4}" / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (32, 32), (10 + 5 * i,) * 3).save(path)


def _numbers(x):
    """The image number of each image of a batch [B, 3, 32, 32] (normalised): its centre pixel, which
    the training crop (4 pixels of padding) never moves off the image."""
    from dsnet.data import CIFAR10_MEAN, CIFAR10_STD

    grey = x[:, 0, 16, 16].double() * CIFAR10_STD[0] + CIFAR10_MEAN[0]
    return {round((round(float(v) * 255) - 10) / 5) for v in grey}


def test_the_held_back_images_are_never_among_those_the_gate_trains_on(tmp_path, monkeypatch):
    _numbered_folder(tmp_path / "data")
    common = [*TINY, "data.name=folder", f"data.root={tmp_path / 'data'}", "train.batch_size=8",
              "train.lr_base_batch=8", "data.synthetic_classes=4", "train.epochs=1", "train.max_steps_per_epoch=1",
              "train.recalibrate_bn=false"]
    run = train_supernet(load_config(None, [*common, f"output.dir={tmp_path / 'run'}"]))
    trained, held = set(), set()
    build = stage_two.build_sgs_step

    def spying_step(*args, **kwargs):
        step = build(*args, **kwargs)
        return lambda x, y, g, backward: trained.update(_numbers(x)) or step(x, y, g, backward)

    collect = stage_two.collect_outcomes

    def spying_collect(model, batches, *args, **kwargs):
        batches = list(batches)
        for x, _ in batches:
            held.update(_numbers(x))
        return collect(model, batches, *args, **kwargs)

    monkeypatch.setattr(stage_two, "build_sgs_step", spying_step)
    monkeypatch.setattr(stage_two, "collect_outcomes", spying_collect)
    stage_two.train_gate(load_config(None, [*common, "train.max_steps_per_epoch=null", "gate.holdout=0.2",
                                            "gate.deploy=gate", f"output.dir={tmp_path / 'gate'}"]),
                         run / "checkpoints" / "last.pth")
    assert len(held) == 8 and len(trained) == 32  # an epoch of the 32 kept images, 4 batches of 8
    assert not held & trained and held | trained == set(range(40))
