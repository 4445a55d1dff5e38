"""Bad inputs to the training commands that once ended with exit 0 and a wrong run, or overwrote
another run: a resume into an output.dir that holds another run, a resume on data of other classes,
and a training set smaller than one batch (every epoch trained no step)."""
import pytest

from dsnet.config import load_config
from dsnet.data import DataError
from dsnet.errors import UserError
from dsnet.train.engine import setup_runtime
from dsnet.train.runs import build_data
from dsnet.train.stage_one import train_supernet
from tests.test_imagecheck import _image
from tests.test_runs import TINY


def _classes(root, names, per_class=8):
    for split in ("train", "val"):
        for c, name in enumerate(names):
            for k in range(per_class):
                _image(root / split / name / f"{k}.jpg", color=(80 * c, 20 * k, 120))


def test_a_resume_into_another_run_or_onto_other_classes_is_refused_and_writes_nothing(tmp_path):
    _classes(tmp_path / "a", ("cat", "dog"))
    _classes(tmp_path / "b", ("cat", "emu"))
    common = [*TINY, "data.name=folder", "train.epochs=1", "train.max_steps_per_epoch=1", "train.recalibrate_bn=false"]
    run = train_supernet(load_config(None, [*common, f"data.root={tmp_path / 'a'}", f"output.dir={tmp_path / 'run'}"]))
    last = run / "checkpoints" / "last.pth"
    other = tmp_path / "other" / "checkpoints" / "last.pth"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"another run's checkpoint")
    with pytest.raises(UserError) as err:
        train_supernet(load_config(None, [*common, f"data.root={tmp_path / 'a'}", "train.epochs=2",
                                          "train.resume_changes=accept", f"output.dir={other.parent.parent}",
                                          f"train.resume={last}"]))
    assert str(err.value) == (
        f"train.resume={last} continues the run in {run}, but output.dir={other.parent.parent} holds another run, "
        f"whose checkpoints it would overwrite; set output.dir={run} (or a new folder to branch the run)")
    assert other.read_bytes() == b"another run's checkpoint"
    before = last.read_bytes()
    with pytest.raises(UserError) as err:
        train_supernet(load_config(None, [*common, f"data.root={tmp_path / 'b'}", "train.epochs=2",
                                          "train.resume_changes=accept", f"output.dir={run}", f"train.resume={last}"]))
    assert str(err.value) == (f"train.resume={last} was trained on 2 classes and the data has 2: class 1 is 'emu' "
                              "in the data but 'dog' in the checkpoint (check data.root)")
    assert last.read_bytes() == before


@pytest.mark.parametrize("holdout", [0.0, 0.25])
def test_a_training_set_smaller_than_one_batch_is_refused(holdout):
    cfg = load_config(None, [*TINY, "data.synthetic_train_size=20", "train.batch_size=16"])
    runtime = setup_runtime("cpu", 0, False)
    if holdout == 0:
        assert len(build_data(cfg, runtime).train) == 1  # 20 images: one batch of 16
        cfg = load_config(None, [*TINY, "data.synthetic_train_size=12", "train.batch_size=16"])
    with pytest.raises(DataError) as err:
        build_data(cfg, runtime, holdout)
    left = "gate.holdout=0.25 leaves 15 training images" if holdout else "the training set has 12 images"
    assert str(err.value) == (f"{left}, fewer than one batch of train.batch_size=16, so no step would train; lower "
                              f"train.batch_size{' or gate.holdout' if holdout else ''}")
