"""``dsnet convert --from ds-net-release`` against what the release's own model code computed
(``tests/release_fixture.py``): logits of the largest route and of each of the 14 static
subnets, and one-line refusals of anything that is not a release checkpoint of this width table.

Kept apart from test_convert.py: it needs the release's recorded fixtures
(``tests/release_fixture.py``), not only dsnet."""
import argparse
import json
from pathlib import Path

import pytest
import torch

import dsnet
from dsnet.train.checkpoint import read_checkpoint
from dsnet.cli import main as dsnet_main
from tests.release_fixture import fixture_input, load_fixture, release_state_dict
from tests.test_convert import refused

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fixture():
    return load_fixture()


@pytest.fixture(scope="module")
def release_file(fixture, tmp_path_factory):
    """What the release's training script writes: a checkpoint-saver dict with the weights under
    'module.' (DDP), their EMA (here the classifier bias moved), and its argparse.Namespace."""
    sd = release_state_dict(fixture)
    ema = {**sd, "classifier.bias": sd["classifier.bias"] + 1.0}
    path = tmp_path_factory.mktemp("release") / "DS_MBNet-70_1.pth.tar"
    torch.save({"epoch": 150, "arch": fixture["arch"], "version": 2, "metric": 70.1,
                "args": argparse.Namespace(model=fixture["arch"], lr=0.08, decay_epochs=[2.4]),
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.08}]},
                "state_dict": {f"module.{k}": v for k, v in sd.items()},
                "state_dict_ema": {f"module.{k}": v for k, v in ema.items()}}, path)
    return path


@pytest.fixture(scope="module")
def converted(release_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "ds_mobilenet_v1.pth"
    assert dsnet_main(["convert", str(release_file), "-o", str(out), "--from", "ds-net-release"]) == 0
    return out


def _rel_max_diff(got, expected):
    return float((got - expected).abs().max() / expected.abs().max())


def test_release_logits_match_on_the_largest_route_and_every_static_subnet(fixture, converted):
    model = dsnet.load_checkpoint(converted)
    assert model.num_subnets == 14 and model.num_classes == fixture["num_classes"]
    x = fixture_input(fixture["input_size"])
    with torch.no_grad():
        for name, expected in fixture["logits"].items():
            subnet = "largest" if name == "largest" else int(name.split("_")[1])
            assert (expected[0] - expected[1]).abs().max() > 0.1 * expected.std(), name  # input-dependent
            assert _rel_max_diff(model(x, subnet=subnet), expected) <= 1e-4, name
            extracted = dsnet.extract_subnet(model, subnet) if subnet != "largest" else None
            if extracted is not None:
                assert _rel_max_diff(extracted.eval()(x), expected) <= 1e-4, name


def test_every_release_tensor_is_mapped_and_the_source_is_recorded(fixture, converted, release_file):
    import hashlib

    state = read_checkpoint(converted, "supernet")
    assert state["source"] == {"file": "DS_MBNet-70_1.pth.tar", "format": "ds-net-release", "entry": "state_dict",
                               "sha256": hashlib.sha256(release_file.read_bytes()).hexdigest()}
    sd = release_state_dict(fixture)
    model = state["model"]
    gate = [k for k in model if k.endswith("gate.width_head.weight")][0]
    torch.testing.assert_close(model[gate], sd["blocks.3.first_block.gate.gate.0.weight"].flatten(1), rtol=0, atol=0)
    # the release's widest BN fills dsnet's widest-width row and its largest-route row
    rm = model["units.0.bn.running_mean"]
    torch.testing.assert_close(rm[1], sd["bn1.aux_bn.1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(rm[2], sd["bn1.aux_bn.1.running_mean"], rtol=0, atol=0)
    torch.testing.assert_close(rm[0, :16], sd["bn1.aux_bn.0.running_mean"], rtol=0, atol=0)


def test_ema_flag_converts_the_ema_weights(fixture, release_file, tmp_path, capsys):
    out = tmp_path / "ema.pth"
    assert dsnet_main(["convert", str(release_file), "-o", str(out), "--from", "ds-net-release", "--ema"]) == 0
    model = dsnet.load_checkpoint(out)
    with torch.no_grad():
        got = model(fixture_input(fixture["input_size"]))
    assert read_checkpoint(out)["source"]["entry"] == "state_dict_ema"
    assert _rel_max_diff(got, fixture["logits"]["largest"] + 1.0) <= 1e-4


def test_other_width_tables_truncated_files_and_strangers_are_refused(fixture, release_file, tmp_path, capsys):
    out = tmp_path / "out.pth"
    sd = release_state_dict(fixture)
    wider = {**sd, "blocks.4.first_block.conv_pw.weight": torch.zeros(1280, 640, 1, 1)}
    torch.save({"state_dict": wider}, tmp_path / "wider.pth")
    err = refused(["convert", str(tmp_path / "wider.pth"), "-o", str(out), "--from", "ds-net-release"], capsys, out)
    assert "'blocks.4.first_block.conv_pw.weight' has shape [1280, 640, 1, 1]" in err and "[1152, 640, 1, 1]" in err
    extra = {**sd, "blocks.5.first_block.conv_dw.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    err = refused(["convert", str(tmp_path / "extra.pth"), "-o", str(out), "--from", "ds-net-release"], capsys, out)
    assert "'blocks.5.first_block.conv_dw.weight'" in err
    missing = {k: v for k, v in sd.items() if k != "blocks.2.residual_blocks.0.gate.conv_expand.bias"}
    torch.save(missing, tmp_path / "missing.pth")
    err = refused(["convert", str(tmp_path / "missing.pth"), "-o", str(out), "--from", "ds-net-release"], capsys, out)
    assert "'blocks.2.residual_blocks.0.gate.conv_expand.bias'" in err
    cut = tmp_path / "cut.pth.tar"
    cut.write_bytes(release_file.read_bytes()[:100_000])
    err = refused(["convert", str(cut), "-o", str(out), "--from", "ds-net-release"], capsys, out)
    assert "truncated or corrupt" in err
    err = refused(["convert", str(release_file), "-o", str(out), "--from", "torchvision-resnet50"], capsys, out)
    assert "conv1.weight" in err


def test_converted_release_goes_through_stage_two_evaluate_export_and_bench(converted, tmp_path, capsys):
    """The converted checkpoint as a stage-one checkpoint of every command (64px synthetic images
    keep it quick; docs/results.md has the same run at 224px)."""
    from dsnet.cli import train_gate_main

    config = str(ROOT / "configs" / "imagenet_ds_mobilenet_v1.yml")
    data = ["data.name=synthetic", "data.input_size=64", "data.synthetic_train_size=10", "data.synthetic_val_size=4",
            "data.synthetic_classes=10", "data.num_workers=0", "data.auto_augment=null", "data.reprob=0",
            "train.batch_size=4", "train.amp=none", "train.channels_last=false", "train.progress=false",
            "gate.epochs=1", f"output.dir={tmp_path / 'gate'}"]
    assert train_gate_main(["-c", config, "--supernet", str(converted), *data]) == 0
    gate = tmp_path / "gate" / "checkpoints" / "last.pth"
    state = read_checkpoint(gate, "gate")
    assert state["step"] == 2 and not torch.equal(
        state["model"]["units.17.gate.width_head.weight"], read_checkpoint(converted)["model"]["units.17.gate.width_head.weight"])
    assert dsnet_main(["evaluate", str(gate), "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert len(report["static"]) == 14 and report["dynamic"] is not None
    assert dsnet_main(["export", str(gate), "--dynamic", "--format", "torchscript", "-o", str(tmp_path / "dyn.pt")]) == 0
    scripted = torch.jit.load(str(tmp_path / "dyn.pt"))
    model = dsnet.load_checkpoint(gate)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x, subnet="dynamic"), rtol=1e-4, atol=1e-4)
    assert dsnet_main(["bench", str(gate), "--batch-sizes", "1", "--repeats", "1", "--json", str(tmp_path / "b.json")]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["results"][0]["batch_size"] == 1
