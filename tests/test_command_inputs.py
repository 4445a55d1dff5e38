"""Bad input to the commands that read a checkpoint (evaluate, export, bench, recalibrate): one
sentence and exit 2 before any evaluation, nothing written or overwritten."""
from __future__ import annotations

import pytest
import timm
from PIL import Image

from dsnet.cli import main as dsnet_main
from dsnet.config import config_to_dict, load_config
from dsnet.train.checkpoint import save_checkpoint
from tests.test_cli import one_error_line
from tests.test_runs import TINY

KWARGS = {"num_classes": 4, "base_mults": (0.25, 0.5), "width_mults": (0.125, 0.25, 0.5)}


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    """A stage-one checkpoint of a synthetic-data run (TINY's config; untrained weights)."""
    folder = tmp_path_factory.mktemp("run")
    model = timm.create_model("ds_resnet20", **KWARGS)
    cfg = load_config(None, [*TINY, f"output.dir={folder}"])
    path = folder / "last.pth"
    save_checkpoint({"stage": "supernet", "model_name": "ds_resnet20", "model_kwargs": KWARGS,
                     "model": model.state_dict(), "ema": None, "config": config_to_dict(cfg),
                     "classes": [f"class_{c}" for c in range(4)]}, path)
    return path


def image_folder(root, classes, n=2):
    """``root/{train,val}/<class>/<i>.png``: n tiny images per class."""
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), (40 * i, 10, 90)).save(root / split / c / f"{i}.png")
    return root


def test_data_for_a_synthetic_run_is_refused_before_evaluating(synthetic_run, tmp_path, capsys):
    data = image_folder(tmp_path / "imgs", [f"class_{c}" for c in range(4)])
    for command in (["evaluate", str(synthetic_run), "--data", str(data)],
                    ["evaluate", str(synthetic_run), f"data.root={data}"],
                    ["recalibrate", str(synthetic_run), "--data", str(data), "-o", str(tmp_path / "r.pth")]):
        assert dsnet_main(command) == 2
        line = one_error_line(capsys, f"dsnet {command[0]}")
        assert line.endswith(f"--data {data} would be ignored: this run was trained on synthetic data "
                             f"(data.name=synthetic); to use an image folder, also pass data.name=folder "
                             f"(e.g. data.name=folder --data {data})")
    assert not (tmp_path / "r.pth").exists()


def test_renamed_class_folders_name_the_first_class_that_differs(synthetic_run, tmp_path, capsys):
    data = image_folder(tmp_path / "imgs", ["class_0", "class_1", "kitten", "class_3"])
    assert dsnet_main(["evaluate", str(synthetic_run), "data.name=folder", "--data", str(data)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == (
        "dsnet evaluate: error: class 'class_2' of the checkpoint is not in the evaluation data, which has "
        "'kitten' instead; pass --data with the dataset it was trained on (class folders named as then)")
    more = image_folder(tmp_path / "more", [f"class_{c}" for c in range(5)])
    assert dsnet_main(["evaluate", str(synthetic_run), "data.name=folder", "--data", str(more)]) == 2
    assert "the evaluation data has 5 classes, the checkpoint was trained on 4 ('class_4' is new)" in one_error_line(capsys, "dsnet evaluate")


def _no_evaluation(monkeypatch):
    import dsnet.report.evaluate

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated before refusing")

    monkeypatch.setattr(dsnet.report.evaluate, "evaluate_static", refuse)


@pytest.mark.parametrize("plot, says", [
    ("{tmp}/nowhere/plot.png", "--plot {tmp}/nowhere/plot.png: the folder {tmp}/nowhere does not exist; create it "
                               "or choose another path"),
    ("{tmp}/plot.xyz", "--plot {tmp}/plot.xyz: matplotlib cannot write '.xyz'; use one of "),
    ("{tmp}/plot.png", "--plot needs matplotlib: pip install 'dsnet[plot]'"),
])
def test_plot_problems_are_refused_before_the_evaluation(synthetic_run, tmp_path, capsys, monkeypatch, plot, says):
    pytest.importorskip("matplotlib")
    _no_evaluation(monkeypatch)
    if "needs matplotlib" in says:
        monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)  # import -> ImportError
    assert dsnet_main(["evaluate", str(synthetic_run), "--plot", plot.format(tmp=tmp_path)]) == 2
    assert one_error_line(capsys, "dsnet evaluate").startswith(f"dsnet evaluate: error: {says.format(tmp=tmp_path)}")


def test_json_onto_the_runs_own_eval_json_is_refused(synthetic_run, tmp_path, capsys, monkeypatch):
    _no_evaluation(monkeypatch)
    (tmp_path / "checkpoints").mkdir()
    ckpt = tmp_path / "checkpoints" / "last.pth"
    ckpt.write_bytes(synthetic_run.read_bytes())
    (tmp_path / "eval.json").write_text('{"static": []}')
    assert dsnet_main(["evaluate", str(ckpt), "--json", str(tmp_path / "eval.json")]) == 2
    assert one_error_line(capsys, "dsnet evaluate").endswith(
        f"--json {tmp_path / 'eval.json'} is the run's own result, written by training; dsnet evaluate never "
        "overwrites it: choose another file")
    assert (tmp_path / "eval.json").read_text() == '{"static": []}'


def test_a_torchscript_file_given_as_a_checkpoint_is_named_as_such(tmp_path, capsys):
    import torch

    torch.jit.script(torch.nn.Linear(2, 2)).save(str(tmp_path / "model.pt"))
    assert dsnet_main(["evaluate", str(tmp_path / "model.pt")]) == 2
    assert one_error_line(capsys, "dsnet evaluate").endswith(
        f"{tmp_path / 'model.pt'} is a TorchScript file (dsnet export writes them to run without dsnet); give the "
        "checkpoint it was exported from, RUN/checkpoints/last.pth, or run it with torch.jit.load")


@pytest.mark.parametrize("option, says", [(["--max-batches", "0"], "--max-batches must be >= 1, got 0"),
                                          (["--sweep", "-3"], "--sweep must be >= 0 (0: the default 9 operating "
                                                              "points), got -3")])
def test_evaluate_refuses_zero_batches_and_a_negative_sweep(synthetic_run, capsys, monkeypatch, option, says):
    _no_evaluation(monkeypatch)  # --max-batches 0 printed 0.00% for every route of 0 images, exit 0
    assert dsnet_main(["evaluate", str(synthetic_run), *option]) == 2
    assert one_error_line(capsys, "dsnet evaluate") == f"dsnet evaluate: error: {says}"


@pytest.mark.parametrize("fmt, name, says", [
    ("safetensors", "model.onnx", "names a onnx file but --format is safetensors; give -o {tmp}/model.safetensors "
                                  "or --format onnx"),
    ("torchscript", "model.safetensors", "names a safetensors file but --format is torchscript; give -o "
                                         "{tmp}/model.pt or --format safetensors"),
])
def test_export_refuses_an_output_named_for_another_format(synthetic_run, tmp_path, capsys, fmt, name, says):
    assert dsnet_main(["export", str(synthetic_run), "--subnet", "0", "--format", fmt, "-o", str(tmp_path / name)]) == 2
    assert one_error_line(capsys, "dsnet export").endswith(f"-o {tmp_path / name} {says.format(tmp=tmp_path)}")
    assert list(tmp_path.iterdir()) == []
