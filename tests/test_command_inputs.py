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
