"""``dsnet.train.engine``: the loop's settings from the config (``loop_kwargs``), and the typed
evaluation that decides ``best.pth`` and what the epoch record holds."""
import dataclasses
import json

import pytest
import torch
from torch import nn

from dsnet.config import Config, load_config
from dsnet.errors import UserError
from dsnet.train.engine import (Evaluation, Loop, Runtime, TrainingError, cudnn_autotune, epoch_seed, loop_kwargs,
                                resolve_device, setup_runtime)


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


# ---- non-finite losses: flagged on the device, read at the log interval and before a save ------

def _nan_loop(tmp_path, bad_steps, log_interval, epochs=2, batches=6):
    model = _Tiny(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    data = [(torch.randn(4, 2), torch.randint(0, 2, (4,))) for _ in range(batches)]
    calls = []

    def step(x, y, generator, backward):
        calls.append(1)
        loss = nn.functional.cross_entropy(model(x), y)
        if len(calls) in bad_steps:
            loss = loss * float("nan")
        backward(loss)
        return {"loss": loss.detach(), "losses": {"ce": loss.detach(), "aux": loss.detach() * 0}}

    def evaluate(epoch):
        return Evaluation({"static": [], "num_samples": 4}, {}, None)

    (tmp_path / "checkpoints").mkdir(exist_ok=True)
    return Loop(cfg=Config(), runtime=Runtime(torch.device("cpu")), stage="static", model=model, train_model=model,
                optimizer=optimizer, scheduler=None, step=step, evaluate=evaluate, train_loader=data, epochs=epochs,
                run_dir=tmp_path, progress=False, log_interval=log_interval)


def test_a_non_finite_loss_stops_the_run_naming_the_steps_and_keeps_the_last_good_checkpoint(tmp_path):
    loop = _nan_loop(tmp_path, bad_steps={9}, log_interval=4)  # epoch 1: steps 1-6 clean, saved; step 9 NaN
    with pytest.raises(TrainingError) as err:
        loop.run()
    assert str(err.value).startswith("non-finite loss in epoch 2, steps 9-12, subnet(s) 'ce', 'aux'; stopped, "
                                      "the last good checkpoint is ")
    assert str(tmp_path / "checkpoints" / "last.pth") in str(err.value)
    assert torch.load(tmp_path / "checkpoints" / "last.pth", weights_only=True)["epoch"] == 1


def test_a_non_finite_loss_between_log_intervals_is_caught_before_the_epochs_checkpoint(tmp_path):
    loop = _nan_loop(tmp_path, bad_steps={2}, log_interval=100, epochs=1)
    with pytest.raises(TrainingError, match=r"non-finite loss in epoch 1, steps 1-6, subnet\(s\) 'ce', 'aux'"):
        loop.run()
    assert not (tmp_path / "checkpoints" / "last.pth").exists()


def test_the_training_loop_does_not_wait_for_the_device_at_every_step(tmp_path, monkeypatch):
    """Between log intervals the loop reads nothing back from the device (a host sync per step
    idles a GPU); the reads it makes are at the log interval and at the epoch's end."""
    loop = _nan_loop(tmp_path, bad_steps=set(), log_interval=100, epochs=1, batches=6)
    reads = []
    for name in ("tolist", "item", "__float__", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, **k: (reads.append(1), _o(self, *a, **k))[1])
    loop.train_epoch(progress=False)
    assert len(reads) <= 4  # the epoch-end finite check and loss means: a handful, not one per step



@pytest.mark.parametrize("terminal", [False, True])
def test_the_epoch_bar_shows_on_a_terminal_only(tmp_path, monkeypatch, capsys, terminal):
    """A run whose stderr is a file (nohup, a scheduler's log) gets no bar frames in it."""
    import sys

    loop = _nan_loop(tmp_path, bad_steps=set(), log_interval=100, epochs=1)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)
    loop.train_epoch(progress=True)
    assert ("static epoch 1/1" in capsys.readouterr().err) == terminal

# ---- devices: one process (auto, cuda, cuda:N) and torchrun (LOCAL_RANK) -------------------------

@pytest.fixture
def two_gpus(monkeypatch):
    """CUDA mocked available with two devices; ``torch.cuda.set_device`` records what it is given
    and, like torch's, refuses a CUDA device without an index."""
    given = []

    def set_device(dev):
        if torch.device(dev).index is None:
            raise ValueError("Expected a torch.device with a specified index or an integer")
        given.append(torch.device(dev))

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    return given


@pytest.mark.parametrize("spec, world, local, expected", [
    ("auto", 1, 0, "cuda:0"), ("cuda", 1, 0, "cuda:0"), ("cuda:1", 1, 0, "cuda:1"), ("cpu", 1, 0, "cpu"),
    ("auto", 2, 1, "cuda:1"), ("cuda", 2, 0, "cuda:0"), ("cuda", 2, 1, "cuda:1"), ("cpu", 2, 1, "cpu"),
])
def test_the_device_of_one_process_or_of_a_torchrun_rank_carries_its_index(two_gpus, spec, world, local, expected):
    dev = resolve_device(spec, world, local)
    assert dev == torch.device(expected)
    assert dev.type == "cpu" or dev.index is not None


@pytest.mark.parametrize("spec, world, local, message", [
    ("cuda:2", 1, 0, "train.device=cuda:2 but this machine shows 2 CUDA device(s) (cuda:0..cuda:1)"),
    ("cuda:0", 2, 1, "train.device=cuda:0 names one GPU, but under torchrun each process takes the GPU of its "
                     "LOCAL_RANK; use train.device=cuda (pick GPUs with CUDA_VISIBLE_DEVICES)"),
    ("cuda", 4, 3, "LOCAL_RANK=3 but this node shows 2 CUDA device(s); start at most 2 processes per node"),
    ("gpu", 1, 0, "train.device=gpu is not a device dsnet runs on (accepted: auto, cpu, cuda, cuda:N)"),
])
def test_a_device_that_cannot_be_had_is_one_sentence(two_gpus, spec, world, local, message):
    with pytest.raises(UserError) as err:
        resolve_device(spec, world, local)
    assert str(err.value).startswith(message)


def test_without_cuda_auto_is_the_cpu_and_cuda_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(UserError, match="train.device=cuda but no CUDA device is available"):
        resolve_device("cuda")


@pytest.mark.parametrize("spec, expected", [("cuda", 0), ("auto", 0), ("cuda:1", 1)])
def test_setup_runtime_gives_set_device_an_indexed_device_in_one_process(two_gpus, monkeypatch, spec, expected):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    runtime = setup_runtime(spec, 0, False)
    assert two_gpus == [torch.device("cuda", expected)] and runtime.device == torch.device("cuda", expected)
    assert not runtime.distributed


@pytest.mark.parametrize("device, deterministic, expected", [("cuda:0", False, True), ("cuda:0", True, False),
                                                              ("cpu", False, False)])
def test_cudnn_autotunes_training_on_a_gpu_unless_the_run_is_deterministic(device, deterministic, expected):
    before = torch.backends.cudnn.benchmark
    with cudnn_autotune(Runtime(torch.device(device), deterministic=deterministic)):
        assert torch.backends.cudnn.benchmark is expected
    assert torch.backends.cudnn.benchmark is before  # evaluation runs routed batches of every size untuned


def test_each_rank_and_epoch_seeds_its_own_augmentation_stream_and_rank_0_keeps_a_single_runs():
    seeds = {epoch_seed(3, rank, epoch) for rank in range(64) for epoch in range(300)}
    assert len(seeds) == 64 * 300
    assert [epoch_seed(3, 0, e) for e in range(3)] == [3 * 7919 + e for e in range(3)]
