"""best.pth and last.pth carry the same BN treatment, and stage two never trains a gate on a
supernet whose BN statistics were not recalibrated."""
import torch

import dsnet.runs
from dsnet.checkpoint import read_checkpoint
from dsnet.runs import bn_recalibrated, train_gate, train_supernet
from tests.test_train import assert_same_weights, tiny


def test_a_best_checkpoint_of_the_final_epoch_is_the_recalibrated_last_one(tmp_path):
    run = train_supernet(tiny(tmp_path, "train.epochs=1"))  # one epoch: it is also the best
    last, best = (read_checkpoint(run / "checkpoints" / f"{n}.pth") for n in ("last", "best"))
    assert last["bn_recalibrated"] and best["bn_recalibrated"]
    assert_same_weights(best["model"], last["model"])
    assert_same_weights(best["ema"], last["ema"])


def test_stage_two_recalibrates_a_supernet_saved_before_recalibration(tmp_path, monkeypatch):
    plain = train_supernet(tiny(tmp_path / "s", "train.epochs=1", "train.recalibrate_bn=false"))
    recalibrated = train_supernet(tiny(tmp_path / "r", "train.epochs=1"))
    state = read_checkpoint(plain / "checkpoints" / "last.pth")
    assert state["bn_recalibrated"] is False and not bn_recalibrated(state)
    calls = []
    original = dsnet.runs.recalibrate_bn
    monkeypatch.setattr(dsnet.runs, "recalibrate_bn",
                        lambda model, *a, **k: (calls.append(model), original(model, *a, **k)))
    gate = train_gate(tiny(tmp_path / "g"), plain / "checkpoints" / "last.pth")
    ckpt = read_checkpoint(gate / "checkpoints" / "last.pth")
    assert len(calls) == 1 and ckpt["bn_recalibrated"]
    before = {k: v for k, v in state["model"].items() if "running_mean" in k}
    assert any(not torch.equal(before[k], ckpt["model"][k]) for k in before)
    assert not (gate / "checkpoints" / "best.pth").exists()  # stage two writes last.pth only
    train_gate(tiny(tmp_path / "h"), recalibrated / "checkpoints" / "last.pth")
    assert len(calls) == 1  # a recalibrated supernet is taken as it is
