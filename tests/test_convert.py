"""``dsnet convert`` of torchvision's ResNet-50 and ``train.init_from``: a converted checkpoint
computes what its source computes, records where it came from, and bad sources write nothing."""
import hashlib

import pytest
import torch
import torchvision

import dsnet
from dsnet.train.checkpoint import init_from_checkpoint, read_checkpoint
from dsnet.cli import main as dsnet_main
from dsnet.config import load_config
from dsnet.train.stage_one import train_supernet
from tests.test_runs import TINY


@pytest.fixture(scope="module")
def resnet50():
    """torchvision resnet50 at random init whose BN statistics are measured on a few batches
    (with BN at init, a deep net's logits barely depend on its input)."""
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = torchvision.models.resnet50()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.uniform_(-0.2, 0.2, generator=g)
        model.train()
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64, generator=g))
    return model.eval()


@pytest.fixture(scope="module")
def resnet50_file(resnet50, tmp_path_factory):
    """The state dict as a DDP training script saves it: a dict with 'state_dict', 'module.' keys."""
    path = tmp_path_factory.mktemp("tv") / "resnet50.pth"
    torch.save({"epoch": 90, "state_dict": {f"module.{k}": v for k, v in resnet50.state_dict().items()}}, path)
    return path


def test_converted_resnet50_largest_route_equals_torchvision(resnet50, resnet50_file, tmp_path, capsys):
    out = tmp_path / "ds_resnet50.pth"
    assert dsnet_main(["convert", str(resnet50_file), "-o", str(out), "--from", "torchvision-resnet50"]) == 0
    assert "dsnet recalibrate" in capsys.readouterr().out
    model = dsnet.load_checkpoint(out)
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = resnet50(x), model(x)
        model.inference_plans = False
        got_modules = model(x)
    assert (expected[0] - expected[1]).abs().max() > 0.1 * expected.std()  # outputs depend on the input
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_modules, expected, rtol=1e-5, atol=1e-5)
    state = read_checkpoint(out, "supernet")
    assert state["source"] == {"file": "resnet50.pth", "format": "torchvision-resnet50", "entry": "state_dict",
                               "sha256": hashlib.sha256(resnet50_file.read_bytes()).hexdigest()}
    assert state["model_name"] == "ds_resnet50" and state["config"]["data"]["input_size"] == 224


def test_narrow_widths_start_from_the_full_widths_leading_bn_statistics(resnet50, resnet50_file, tmp_path):
    out = tmp_path / "ds.pth"
    assert dsnet_main(["convert", str(resnet50_file), "-o", str(out), "--from", "torchvision-resnet50"]) == 0
    bn = dsnet.load_checkpoint(out).units[6].body[1].bn  # layer2.0.bn2: widths 32, 64, 96, 128
    full = resnet50.layer2[0].bn2.running_var
    for row, width in enumerate((*bn.choices, 128)):
        torch.testing.assert_close(bn.running_var[row, :width], full[:width], rtol=0, atol=0)


def refused(argv, capsys, out):
    """Run ``dsnet`` argv; it must fail with one line on stderr and leave ``out`` unwritten."""
    assert dsnet_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err


def test_wrong_sources_end_in_one_line_and_write_nothing(resnet50_file, tmp_path, capsys):
    out = tmp_path / "out.pth"
    err = refused(["convert", str(resnet50_file), "-o", str(out), "--from", "ds-net-release"], capsys, out)
    assert "conv_stem.weight" in err and "conv1.weight" in err
    cut = tmp_path / "cut.pth"
    cut.write_bytes(resnet50_file.read_bytes()[: resnet50_file.stat().st_size // 2])
    err = refused(["convert", str(cut), "-o", str(out), "--from", "torchvision-resnet50"], capsys, out)
    assert "truncated or corrupt" in err
    sd = torch.load(resnet50_file, weights_only=True)["state_dict"]
    sd["module.layer3.2.conv2.weight"] = sd["module.layer3.2.conv2.weight"][:128]  # another width table
    torch.save(sd, tmp_path / "narrow.pth")
    err = refused(["convert", str(tmp_path / "narrow.pth"), "-o", str(out), "--from", "torchvision-resnet50"],
                   capsys, out)
    assert "'layer3.2.conv2.weight' has shape [128, 256, 3, 3]" in err and "[256, 256, 3, 3]" in err
    sd = torch.load(resnet50_file, weights_only=True)["state_dict"]
    sd["module.extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "extra.pth")
    err = refused(["convert", str(tmp_path / "extra.pth"), "-o", str(out), "--from", "torchvision-resnet50"],
                   capsys, out)
    assert "'extra.weight'" in err
    err = refused(["convert", str(resnet50_file), "-o", str(out), "--from", "torchvision-resnet50", "--ema"],
                   capsys, out)
    assert "state_dict_ema" in err


def test_convert_never_overwrites(resnet50_file, tmp_path, capsys):
    out = tmp_path / "out.pth"
    out.write_bytes(b"keep")
    assert dsnet_main(["convert", str(resnet50_file), "-o", str(out), "--from", "torchvision-resnet50"]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_init_from_starts_a_new_run_from_weights_with_a_fresh_schedule(tmp_path):
    first = train_supernet(load_config(None, [*TINY, f"output.dir={tmp_path / 'a'}", "train.epochs=1"]))
    source = first / "checkpoints" / "last.pth"
    run = train_supernet(load_config(None, [*TINY, f"output.dir={tmp_path / 'b'}", "train.epochs=1",
                                            "train.lr=1e-9", "train.weight_decay=0", f"train.init_from={source}"]))
    a, b = read_checkpoint(source)["model"], read_checkpoint(run / "checkpoints" / "last.pth")
    assert b["epoch"] == 1  # a fresh schedule (resuming would have continued at epoch 2)
    for key in ("units.0.conv.weight", "units.5.body.1.conv.weight", "classifier.weight"):
        torch.testing.assert_close(b["model"][key], a[key], rtol=0, atol=1e-6)


def test_init_from_keeps_a_classifier_for_another_class_count(tmp_path):
    run = train_supernet(load_config(None, [*TINY, f"output.dir={tmp_path}", "train.epochs=1"]))
    import timm

    kwargs = {**read_checkpoint(run / "checkpoints" / "last.pth")["model_kwargs"], "num_classes": 7}
    model = timm.create_model("ds_resnet20", **kwargs)
    built = {k: v.clone() for k, v in model.state_dict().items()}
    kept = init_from_checkpoint(model, run / "checkpoints" / "last.pth")
    assert kept == ["classifier.weight", "classifier.bias"]
    torch.testing.assert_close(model.classifier.weight, built["classifier.weight"], rtol=0, atol=0)
    source = read_checkpoint(run / "checkpoints" / "last.pth")["model"]
    torch.testing.assert_close(model.units[0].conv.weight, source["units.0.conv.weight"], rtol=0, atol=0)
    other = timm.create_model("ds_resnet20", num_classes=4, gate_stage=2,
                              **{k: v for k, v in kwargs.items() if k not in ("num_classes",)})
    with pytest.raises(ValueError, match="gate_stage|does not fit"):
        init_from_checkpoint(other, run / "checkpoints" / "last.pth")


def test_convert_maps_weights_on_the_cpu_whatever_gpus_there_are(resnet50_file, tmp_path, monkeypatch):
    """Conversion reads, maps and writes tensors on the CPU (no device to choose): CUDA available
    changes nothing, and the checkpoint loads anywhere."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail(f"convert chose a GPU: {dev}"))
    out = tmp_path / "ds_resnet50.pth"
    assert dsnet_main(["convert", str(resnet50_file), "-o", str(out), "--from", "torchvision-resnet50"]) == 0
    assert all(t.device.type == "cpu" for t in read_checkpoint(out, "supernet")["model"].values())
