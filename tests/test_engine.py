"""``dsnet.train.engine``: the loop's settings from the config (``loop_kwargs``), and the typed
evaluation that decides ``best.pth`` and what the epoch record holds."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from dsnet.config import Config, load_config
from dsnet.train.engine import Evaluation, Loop, Runtime, loop_kwargs


def test_loop_kwargs_carry_every_loop_setting_from_the_train_and_output_sections():
    cfg = load_config(None, ["train.grad_accum=3", "train.seed=7", "train.batch_size=5", "train.max_steps_per_epoch=4",
                             "train.channels_last=true", "train.log_interval=9", "train.eval_interval=2",
                             "train.progress=false", "output.checkpoint_interval=6", "output.tensorboard=false"])
    settings = {f.name for f in dataclasses.fields(Loop)} & set(loop_kwargs(cfg))
    assert settings == set(loop_kwargs(cfg))  # every key is a field of Loop
    assert loop_kwargs(cfg) == {"grad_accum": 3, "seed": 7, "batch_size": 5, "max_steps_per_epoch": 4,
                                "channels_last": True, "log_interval": 9, "eval_interval": 2, "progress": False,
                                "checkpoint_interval": 6, "tensorboard": False}


def test_an_evaluation_record_holds_the_report_then_the_scalars_then_the_best_metric():
    report = {"static": [], "num_samples": 3}
    assert list(Evaluation(report, {"top1": 50.0}, 50.0).record().items()) == [
        ("eval", report), ("top1", 50.0), ("best_metric", 50.0)]
    assert Evaluation(report, {"top1": 50.0}).record() == {"eval": report, "top1": 50.0}
    back = Evaluation.from_record({"stage": "x", "eval": report, "top1": 50.0, "best_metric": 40.0})
    assert back.report is report and back.best_metric == 40.0
    assert Evaluation.from_record({"stage": "x", "epoch": 1}) is None


class _Tiny(nn.Linear):
    model_name, model_kwargs = "tiny", {}


def _loop(tmp_path, accuracies, with_best):
    model = _Tiny(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    batches = [(torch.randn(4, 2), torch.randint(0, 2, (4,)))]

    def step(x, y, generator, backward):
        loss = nn.functional.cross_entropy(model(x), y)
        backward(loss)
        return {"loss": loss.detach(), "losses": {"ce": loss.detach()}}

    def evaluate(epoch):
        top1 = accuracies[epoch - 1]
        return Evaluation({"static": [], "num_samples": 4}, {"top1": top1}, top1 if with_best else None)

    return Loop(cfg=Config(), runtime=Runtime(torch.device("cpu")), stage="static", model=model, train_model=model,
                optimizer=optimizer, scheduler=None, step=step, evaluate=evaluate, train_loader=batches,
                epochs=len(accuracies), run_dir=tmp_path, progress=False)


@pytest.mark.parametrize("with_best", [True, False])
def test_best_pth_is_the_best_epoch_when_the_evaluation_ranks_and_absent_when_it_does_not(tmp_path, with_best):
    (tmp_path / "checkpoints").mkdir()
    loop = _loop(tmp_path, [30.0, 60.0, 45.0], with_best)
    loop.run()
    best = tmp_path / "checkpoints" / "best.pth"
    assert best.exists() == with_best
    if with_best:
        assert torch.load(best, weights_only=True)["epoch"] == 2 and loop.best == 60.0
    assert loop.last_eval.scalars == {"top1": 45.0}
    epochs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
              if "train_loss_ce" in line]
    assert [r["top1"] for r in epochs] == [30.0, 60.0, 45.0]
    assert all(("best_metric" in r) == with_best for r in epochs)
