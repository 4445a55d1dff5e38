"""Resuming a run with a changed config (``dsnet.train.engine.resume_changes``,
``Loop.retrain_changed``, ``record_config``): a key that alters the training is refused, by name,
unless ``train.resume_changes=accept``; accepted, the new epochs train on the new config's schedule
(never at lr 0); keys that do not alter the training pass; every config the run saw is kept."""
import json

import pytest
import yaml

from dsnet.config import load_config
from dsnet.errors import UserError
from dsnet.train.checkpoint import read_checkpoint
from dsnet.train.stage_one import train_supernet
from tests.test_runs import TINY


def tiny(out, *extra):
    return load_config(None, [*TINY, "train.recalibrate_bn=false", "train.log_interval=1", "data.synthetic_train_size=64",
                              "data.synthetic_val_size=16", f"output.dir={out}", *extra])


def lrs(run, epoch):
    """The lr of every optimizer step of ``epoch``, as metrics.jsonl logged them."""
    return [r["lr"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "losses" in r and r["epoch"] == epoch]


def test_resume_with_more_epochs_and_another_batch_is_refused_then_trains_as_a_run_of_that_config(tmp_path):
    run = train_supernet(tiny(tmp_path / "run", "train.epochs=1"))  # 64 images, 4 steps of 16
    last = run / "checkpoints" / "last.pth"
    before = last.read_bytes()
    changed = ["train.epochs=2", "train.batch_size=32"]
    with pytest.raises(UserError) as err:
        train_supernet(tiny(run, *changed, f"train.resume={last}"))
    assert str(err.value) == (
        f"train.resume={last} was trained with another config, and train.epochs 1 -> 2, train.batch_size 16 -> 32 "
        "would change its training; resume with the checkpoint's values, or add train.resume_changes=accept to "
        "train on with the new ones (the lr schedule is rebuilt)")
    assert last.read_bytes() == before and not list(run.glob("config.resume-*"))

    train_supernet(tiny(run, *changed, f"train.resume={last}", "train.resume_changes=accept"))
    straight = train_supernet(tiny(tmp_path / "straight", *changed))
    resumed = lrs(run, 2)
    # two steps of 32; the lr after the last is the schedule's end (min_lr 0); the old schedule gave 0.0 throughout
    assert len(resumed) == 2 and resumed[0] > 0
    # the 2-epoch schedule at batch 32 (lr x 2, lr_base_batch 16), taken up at its step 2 (not 4)
    assert resumed == pytest.approx(lrs(straight, 2), rel=1e-12)
    assert read_checkpoint(last)["step"] == read_checkpoint(straight / "checkpoints" / "last.pth")["step"] == 4
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["batch_size"] == 16  # what the run started with
    assert yaml.safe_load((run / "config.resume-1.yaml").read_text())["train"]["batch_size"] == 32


def test_keys_that_do_not_alter_training_pass_and_a_second_resume_keeps_every_config(tmp_path):
    one = ["train.max_steps_per_epoch=1"]
    run = train_supernet(tiny(tmp_path, "train.epochs=1", *one))
    last = run / "checkpoints" / "last.pth"
    # output, progress, logging, device, workers, evaluation and the other stage's keys are no change
    quiet = ["train.log_interval=5", "train.progress=true", "train.device=cpu", "data.num_workers=0",
             "train.eval_interval=2", "output.checkpoint_interval=2", "gate.epochs=7"]
    train_supernet(tiny(run, "train.epochs=2", *one, f"train.resume={last}", "train.resume_changes=accept"))
    train_supernet(tiny(run, "train.epochs=2", *one, *quiet, f"train.resume={last}", "train.resume_changes=accept"))
    assert sorted(p.name for p in run.glob("config*.yaml")) == ["config.resume-1.yaml", "config.resume-2.yaml",
                                                                "config.yaml"]
    assert yaml.safe_load((run / "config.resume-2.yaml").read_text())["gate"]["epochs"] == 7
    with pytest.raises(UserError, match=r"has trained 2 epochs and the new config asks for 2, so its changes "
                                        r"\(train.lr 0.1 -> 0.2\) would train nothing"):
        train_supernet(tiny(run, "train.epochs=2", *one, "train.lr=0.2", f"train.resume={last}",
                            "train.resume_changes=accept"))
