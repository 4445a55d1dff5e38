"""``dsnet.train.runs`` (and ``dsnet.train.stage_two``) in short real runs of both stages: teacher modes,
checkpoints, exact resume, DDP, stage-two freeze, and the BN treatment of best.pth and last.pth
(stage two never trains a gate on a supernet whose BN statistics were not recalibrated)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import dsnet
import dsnet.train.stage_two
from dsnet.train.checkpoint import load_checkpoint, read_checkpoint
from dsnet.config import load_config, replace
from dsnet.train.stage_two import bn_recalibrated, train_gate
from dsnet.train.runs import to_channels_last
from dsnet.train.stage_one import train_supernet

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=ds_resnet20", "model.kwargs={base_mults: [0.25, 0.5], width_mults: [0.125, 0.25, 0.5]}",
    "data.name=synthetic", "data.synthetic_train_size=96", "data.synthetic_val_size=32",
    "data.synthetic_classes=4", "data.num_workers=0", "train.batch_size=16", "train.epochs=2",
    "train.lr_base_batch=16", "train.progress=false", "train.log_interval=2", "train.deterministic=true",
    "train.recalibrate_batches=2", "ieb.num_random=1", "gate.epochs=1",
]


def tiny(tmp_path, *extra):
    return load_config(None, [*TINY, f"output.dir={tmp_path}", *extra])


def weights(path, key="model"):
    return read_checkpoint(path)[key]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("teacher", ["ensemble", "ema", "inplace", "none"])
def test_stage_one_runs_each_teacher_mode_and_writes_the_run_dir(tmp_path, teacher):
    run = train_supernet(tiny(tmp_path, f"ieb.teacher={teacher}", "train.epochs=1"))
    ckpt = read_checkpoint(run / "checkpoints" / "last.pth", "supernet")
    assert (ckpt["ema"] is None) == (teacher in ("inplace", "none"))
    assert ckpt["epoch"] == 1 and ckpt["config"]["ieb"]["teacher"] == teacher
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("losses" in r for r in records) and any("eval" in r for r in records)
    report = json.loads((run / "eval.json").read_text())
    assert len(report["static"]) == 3 and report["dynamic"] is None
    assert (run / "config.yaml").is_file()
    model = dsnet.load_checkpoint(run / "checkpoints" / "last.pth")  # the public API of DESIGN.md
    assert not model.training and model.num_subnets == 3


def test_stage_one_trains_the_supernet_but_not_the_width_head(tmp_path):
    run = train_supernet(tiny(tmp_path, "train.epochs=1", "train.recalibrate_bn=false"))
    state = weights(run / "checkpoints" / "last.pth")
    fresh = load_checkpoint(run / "checkpoints" / "last.pth")  # same shapes; compare to a new init
    import timm
    init = timm.create_model("ds_resnet20", **read_checkpoint(run / "checkpoints" / "last.pth")["model_kwargs"])
    head = [k for k in state if "width_head" in k]
    assert head and all(torch.equal(state[k], init.state_dict()[k]) for k in head)
    assert not torch.equal(state["classifier.weight"], init.state_dict()["classifier.weight"])
    assert_same_weights(fresh.state_dict(), state)


def interrupt_after_first_epoch(monkeypatch):
    """Make the step raise KeyboardInterrupt once epoch 2 starts (after epoch 1's checkpoint)."""
    from dsnet.train import engine

    original = engine.Loop.train_epoch

    def train_epoch(self, progress):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self, progress)

    monkeypatch.setattr(engine.Loop, "train_epoch", train_epoch)


def test_resume_after_interruption_matches_an_uninterrupted_run(tmp_path, monkeypatch):
    cfg = tiny(tmp_path / "straight")
    straight = train_supernet(cfg)
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        with pytest.raises(KeyboardInterrupt):
            train_supernet(replace(cfg, **{"output.dir": str(tmp_path / "broken")}))
    assert read_checkpoint(tmp_path / "broken" / "checkpoints" / "last.pth")["epoch"] == 1
    resumed = train_supernet(replace(cfg, **{"output.dir": str(tmp_path / "broken"),
                                             "train.resume": str(tmp_path / "broken/checkpoints/last.pth")}))
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    epochs = [r["epoch"] for r in records if "train_time_s" in r and "recalibrated" not in r]
    assert epochs == [1, 2]  # resumed at epoch 2, not trained again from the start (same weights either way)
    for key in ("model", "ema", "optimizer"):
        a, b = weights(straight / "checkpoints/last.pth", key), weights(resumed / "checkpoints/last.pth", key)
        if key == "optimizer":
            a = {i: s["momentum_buffer"] for i, s in a["state"].items()}
            b = {i: s["momentum_buffer"] for i, s in b["state"].items()}
        assert_same_weights(a, b)


def test_existing_run_is_not_overwritten(tmp_path):
    cfg = tiny(tmp_path, "train.epochs=1", "train.recalibrate_bn=false")
    train_supernet(cfg)
    before = (tmp_path / "checkpoints/last.pth").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        train_supernet(cfg)
    assert (tmp_path / "checkpoints/last.pth").read_bytes() == before


def test_stage_two_changes_only_the_width_head_bit_for_bit(tmp_path):
    run = train_supernet(tiny(tmp_path, "train.epochs=1"))
    supernet = run / "checkpoints/last.pth"
    gate_run = train_gate(tiny(tmp_path, "gate.holdout=0"), supernet)  # the gate ships as trained
    assert gate_run == tmp_path / "gate"
    before, after = weights(supernet), weights(gate_run / "checkpoints/last.pth")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("width_head" in k for k in changed), changed
    report = json.loads((gate_run / "eval.json").read_text())
    dyn = report["dynamic"]
    expected = _gate_report(load_checkpoint(gate_run / "checkpoints/last.pth"), tiny(tmp_path))
    assert dyn["routing"] == pytest.approx(expected["routing"])
    assert dyn["gate_accuracy"] == pytest.approx(expected["gate_accuracy"])
    assert dyn["madds_mean"] == pytest.approx(expected["madds_mean"], rel=1e-12)
    # dsnet evaluate reproduces the run's own evaluation exactly (argmax routing, no noise)
    from dsnet.cli import main as dsnet_main

    out, plot = tmp_path / "again.json", tmp_path / "plot.png"
    assert dsnet_main(["evaluate", str(gate_run / "checkpoints/last.pth"), "--json", str(out),
                       "--plot", str(plot), "--sweep", "3"]) == 0
    again = json.loads(out.read_text())
    assert again["dynamic"] == dyn and again["static"] == report["static"]
    assert [row["strength"] for row in again["sweep"]] == [-3.0, 0.0, 3.0]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def _gate_report(model, cfg):
    """Routing, gate accuracy (against the published SGS rule) and mean MAdds of the gated model,
    recomputed from plain static forwards and the gate's argmax over the validation set."""
    from dsnet.train.engine import setup_runtime
    from dsnet.train.runs import build_val_loader

    loader, _ = build_val_loader(cfg, setup_runtime("cpu", 0, False))
    space, choices, targets = model.routing_space, [], []
    for x, y in loader:
        right = [model(x, subnet=s).argmax(1) == y for s in space]
        targets += torch.where(right[0], 0, len(space) - 1).tolist()  # slimmest right: easy
        choices += model.forward_gate(x)[1].argmax(1).tolist()
    head = model.gate.width_head.in_features * model.gate.width_head.out_features
    cost = [dsnet.count_madds(model, s, (3, 32, 32)) + head for s in space]
    n = len(choices)
    return {"routing": [choices.count(r) / n for r in range(len(space))],
            "gate_accuracy": 100.0 * sum(c == t for c, t in zip(choices, targets)) / n,
            "madds_mean": sum(cost[c] for c in choices) / n}


def test_stage_two_refuses_a_mismatched_supernet(tmp_path):
    run = train_supernet(tiny(tmp_path / "a", "train.epochs=1", "train.recalibrate_bn=false"))
    other = tiny(tmp_path / "b", "model.kwargs={base_mults: [0.25, 0.5], width_mults: [0.25, 0.5]}")
    with pytest.raises(ValueError, match="was built with"):
        train_gate(other, run / "checkpoints/last.pth")
    with pytest.raises(ValueError, match="classes"):
        train_gate(tiny(tmp_path / "c", "data.synthetic_classes=5"), run / "checkpoints/last.pth")
    with pytest.raises(ValueError, match="expected 'supernet'"):
        train_gate(tiny(tmp_path / "d"), _gate_checkpoint(tmp_path, run))


def _gate_checkpoint(tmp_path, run):
    return train_gate(tiny(tmp_path / "g"), run / "checkpoints/last.pth") / "checkpoints/last.pth"


class _Stop(Exception):
    pass


def _single_process_sandwiches(out, monkeypatch):
    """The sandwiches of one process's first epoch with the DDP run's global batch (16)."""
    from dsnet.train.ieb import IEBStep

    plans, original = [], IEBStep.plan

    def plan(self, generator):
        plans.append(original(self, generator))
        return plans[-1]

    def stop(*args, **kwargs):  # the first evaluation comes after the last step
        raise _Stop

    monkeypatch.setattr(IEBStep, "plan", plan)
    monkeypatch.setattr("dsnet.train.stage_one.evaluate_static", stop)
    with pytest.raises(_Stop):
        train_supernet(tiny(out, "train.epochs=1", "train.recalibrate_bn=false"))
    assert len(plans) == 96 // 16 and len(set(map(tuple, plans))) > 1
    return plans


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_two_process_torchrun_draws_one_sandwich_per_step_and_syncs_gradients(tmp_path, monkeypatch):
    """Both ranks train the sandwiches a single process with the same global batch trains, step by
    step; and they end with the same weights although each saw its own shard of every batch (the
    gradients of the whole sandwich were all-reduced, not only the last subnet's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29533",
           str(ROOT / "tests" / "ddp_worker.py"), str(tmp_path), *TINY, "train.epochs=1",
           "train.batch_size=8", f"output.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert a["plans"] == b["plans"]
    assert a["plans"] == _single_process_sandwiches(tmp_path / "single", monkeypatch)
    assert_same_weights(a["state"], b["state"])


def test_model_and_routing_space_errors_stop_before_a_run_directory_exists(tmp_path):
    with pytest.raises(ValueError, match=r"model\.kwargs\): the kwargs .* do not fit ds_resnet20: out_choices must be a non-empty"):
        train_supernet(tiny(tmp_path / "a", "model.kwargs={width_mults: []}"))
    assert not (tmp_path / "a").exists()
    run = train_supernet(tiny(tmp_path / "b", "train.epochs=1", "train.recalibrate_bn=false"))
    with pytest.raises(ValueError, match=r"gate\.routing_space \[0, 7\] is outside the supernet's 3 static subnets"):
        train_gate(tiny(tmp_path / "c", "gate.routing_space=[0, 7]"), run / "checkpoints/last.pth")
    assert not (tmp_path / "c").exists()


def test_recalibration_reads_training_images_with_the_training_transform(tmp_path):
    from dsnet.train.engine import setup_runtime
    from dsnet.train.runs import build_data

    data = build_data(tiny(tmp_path), setup_runtime("cpu", 0, False))
    assert data.calib.dataset is data.train.dataset  # augmented, as training saw them
    assert data.calib.sampler is not data.train.sampler  # but its own loader: never distributed


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
    original = dsnet.train.stage_two.recalibrate_run
    monkeypatch.setattr(dsnet.train.stage_two, "recalibrate_run",
                        lambda model, *a, **k: (calls.append(model), original(model, *a, **k)))
    gate = train_gate(tiny(tmp_path / "g"), plain / "checkpoints" / "last.pth")
    ckpt = read_checkpoint(gate / "checkpoints" / "last.pth")
    assert len(calls) == 1 and ckpt["bn_recalibrated"]
    before = {k: v for k, v in state["model"].items() if "running_mean" in k}
    assert any(not torch.equal(before[k], ckpt["model"][k]) for k in before)
    assert not (gate / "checkpoints" / "best.pth").exists()  # stage two writes last.pth only
    train_gate(tiny(tmp_path / "h"), recalibrated / "checkpoints" / "last.pth")
    assert len(calls) == 1  # a recalibrated supernet is taken as it is


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_torchrun_ranks_augment_apart_and_reshuffle_every_epoch(tmp_path):
    """Every training image is the same picture, so two batches differ only by augmentation: the
    ranks' first batches differ (their loader workers are seeded per rank, not in lockstep), and
    each rank's epochs differ too. Each epoch the ranks draw disjoint shards of the whole set, in
    an order that changes from epoch to epoch (the sampler's epoch advances)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29537",
           str(ROOT / "tests" / "ddp_streams_worker.py"), str(tmp_path), *TINY, "train.epochs=2",
           "data.num_workers=1", "train.batch_size=8", "train.eval_interval=2", f"output.dir={tmp_path / 'run'}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    per_epoch = 96 // 2 // 8
    assert len(a["batches"]) == len(b["batches"]) == 2 * per_epoch
    assert not torch.equal(a["batches"][0], b["batches"][0]), "the ranks drew the same augmentation"
    assert not torch.equal(a["batches"][0], a["batches"][per_epoch]), "a rank's epochs drew the same augmentation"
    assert len(a["indices"]) == len(b["indices"]) == 2
    for epoch in range(2):
        assert sorted(a["indices"][epoch] + b["indices"][epoch]) == list(range(96))
    assert a["indices"][0] != a["indices"][1] and b["indices"][0] != b["indices"][1], "the order did not change"


def test_channels_last_weights_get_gradients_laid_out_as_they_are_so_ddp_never_copies_them():
    """DDP's gradient buckets take each parameter's strides; a gradient with other strides is
    copied every step (and DDP warns). Under ``train.channels_last`` every weight's gradient comes
    back with its weight's strides, the depthwise [C, 1, k, k] ones included."""
    model = to_channels_last(timm.create_model("ds_mobilenet_v1", num_classes=4))
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    model(x).sum().backward()
    wide = [p for p in model.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[2] > 1]
    assert wide and all(p.is_contiguous(memory_format=torch.channels_last) for p in wide)
    assert [n for n, p in model.named_parameters() if p.grad is not None and p.grad.stride() != p.stride()] == []


@pytest.mark.parametrize("interval, gated", [(None, 2), (1, 4)])
def test_stage_two_evaluates_the_frozen_subnets_once_and_the_gate_at_its_interval(tmp_path, monkeypatch, interval,
                                                                                 gated):
    """The static subnets of a frozen supernet score the same every epoch: evaluated once. The
    gate: at the last epoch and once more with the shipped policy, or every ``gate.eval_interval``."""
    run = train_supernet(tiny(tmp_path, "train.epochs=1"))
    calls = {"static": 0, "gated": 0}
    for name, key in (("evaluate_static", "static"), ("evaluate_gated", "gated")):
        original = getattr(dsnet.train.stage_two, name)
        monkeypatch.setattr(dsnet.train.stage_two, name,
                            lambda *a, _o=original, _k=key, **k: (calls.__setitem__(_k, calls[_k] + 1), _o(*a, **k))[1])
    extra = [] if interval is None else [f"gate.eval_interval={interval}"]
    gate_run = train_gate(tiny(tmp_path, "gate.epochs=3", *extra), run / "checkpoints/last.pth")
    assert calls == {"static": 1, "gated": gated}
    report = json.loads((gate_run / "eval.json").read_text())
    assert len(report["static"]) == 3 and report["dynamic"]["madds_mean"] > 0


def test_resume_auto_on_a_finished_stage_one_run_recalibrates_nothing_again(tmp_path, monkeypatch):
    """The same command run again (``train.resume=auto``) after stage one finished: the
    checkpoint's recalibrated statistics and eval.json stand, no second recalibration."""
    import dsnet.train.stage_one

    run = train_supernet(tiny(tmp_path))
    before, report = weights(run / "checkpoints" / "last.pth"), (run / "eval.json").read_text()
    calls = []
    monkeypatch.setattr(dsnet.train.stage_one, "recalibrate_run", lambda *a, **k: calls.append(1))
    assert train_supernet(tiny(tmp_path, "train.resume=auto")) == run
    assert calls == [] and (run / "eval.json").read_text() == report
    assert_same_weights(weights(run / "checkpoints" / "last.pth"), before)
    train_supernet(tiny(tmp_path, "train.epochs=3", "train.resume=auto", "train.resume_changes=accept"))
    assert calls  # an added epoch changed the weights: its statistics are recalibrated
