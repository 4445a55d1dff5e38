"""Safe checkpoints: atomic writes, refusal of unsafe / broken / foreign files, NaN stops."""
import errno
import os

import pytest
import torch

from dsnet.train import checkpoint as ckpt
from dsnet.train.checkpoint import CheckpointError, read_checkpoint, save_checkpoint
from dsnet.cli import main as dsnet_main


def _write(path, **extra):
    return save_checkpoint({"stage": "supernet", "model": {"w": torch.arange(4.0)}, **extra}, path)


def test_round_trip_with_weights_only(tmp_path):
    path = _write(tmp_path / "a.pth", epoch=3)
    state = torch.load(path, weights_only=True)
    assert state["format"] == ckpt.FORMAT and state["epoch"] == 3
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pth"
    torch.save({"format": ckpt.FORMAT, "stage": "supernet", "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused"):
        read_checkpoint(path)
    assert not (tmp_path / "pwned").exists()


def test_truncated_missing_and_foreign_files_give_one_sentence(tmp_path):
    path = _write(tmp_path / "a.pth")
    data = path.read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        read_checkpoint(tmp_path / "cut.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        read_checkpoint(tmp_path / "nope.pth")
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="not a dsnet checkpoint"):
        read_checkpoint(tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="expected 'gate'"):
        read_checkpoint(path, "gate")


def test_cli_reports_a_corrupt_checkpoint_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.pth").write_bytes(b"not a checkpoint")
    assert dsnet_main(["evaluate", str(tmp_path / "bad.pth")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "bad.pth" in err and "Traceback" not in err


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = _write(tmp_path / "last.pth", epoch=1)
    before = path.read_bytes()

    def full_disk(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    with pytest.raises(OSError, match="previous checkpoint is kept"):
        _write(path, epoch=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_non_finite_loss_stops_naming_step_and_subnet_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from dsnet.train import ieb
    from dsnet.config import replace
    from dsnet.train.engine import TrainingError
    from dsnet.train.stage_one import train_supernet
    from tests.test_runs import tiny

    cfg = tiny(tmp_path, "train.epochs=1", "train.recalibrate_bn=false")
    train_supernet(cfg)
    last = tmp_path / "checkpoints" / "last.pth"
    before = last.read_bytes()
    monkeypatch.setattr(ieb, "soft_cross_entropy", lambda logits, target: logits.sum() * float("nan"))
    resumed = replace(cfg, **{"train.epochs": 2, "train.resume": str(last), "train.resume_changes": "accept"})
    # random0 goes NaN at step 7, its NaN weights make every loss NaN at step 8, where the log interval reads them
    with pytest.raises(TrainingError, match=r"epoch 2, steps 7-8, subnet\(s\) 'largest', 'random0', 'slimmest'"):
        train_supernet(resumed)
    assert last.read_bytes() == before
