"""The options that express the DS-Net release's recipe (configs/imagenet_ds_mobilenet_v1_release.yml):
timm's initialisation, GMAdds as the complexity unit, stage-two label smoothing and EMA, the
EMA evaluated and reported, cool-down epochs, BN recalibration with a momentum.

A suite across modules (config, models, runs, sgs, recalibrate), kept together because each
test checks one setting of the release's recipe from end to end."""
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import dsnet
import dsnet.train.sgs
from dsnet.train.checkpoint import read_checkpoint
from dsnet.cli import main as dsnet_main
from dsnet.train.runs import build_model
from dsnet.train.stage_two import train_gate
from dsnet.train.stage_one import train_supernet
from dsnet.train.sgs import SGSStep, frozen_forward, route_targets
from tests.test_runs import tiny

SMALL = {"base_mults": [0.25, 0.5], "width_mults": [0.125, 0.25, 0.5]}


def test_timm_init_gives_depthwise_filters_the_release_spread():
    torch.manual_seed(0)
    ours, release = (timm.create_model("ds_mobilenet_v1", num_classes=10, init=i) for i in ("dsnet", "timm"))
    for name, w in release.named_parameters():
        conv = dict(release.named_modules())[name.rsplit(".", 1)[0]]
        if isinstance(conv, torch.nn.Conv2d) and name.endswith("weight") and conv.out_channels >= 256:
            fan_out = conv.kernel_size[0] * conv.kernel_size[1] * conv.out_channels // conv.groups
            assert float(w.detach().std()) == pytest.approx(math.sqrt(2 / fan_out), rel=0.1), name
    depthwise = [n for n, m in release.named_modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1][-1]
    std = {k: float(dict(net.named_modules())[depthwise].weight.detach().std()) for k, net in (("d", ours), ("t", release))}
    assert std["t"] > 20 * std["d"]  # sqrt(2/9) against Kaiming's sqrt(2/(9 x 1152))
    bound = 1 / math.sqrt(10)
    assert float(release.classifier.weight.abs().max()) <= bound and not release.classifier.bias.any()
    assert float(release.classifier.weight.abs().max()) > bound / 2


def test_an_unknown_init_is_refused_naming_the_choices(tmp_path):
    cfg = tiny(tmp_path, "model.name=ds_mobilenet_v1", "model.kwargs={init: kaiming}")
    with pytest.raises(ValueError, match="init must be one of dsnet, timm, got 'kaiming'"):
        build_model(cfg, 4)


def _spy_sgs_step(monkeypatch):
    seen = {}
    original = dsnet.train.sgs.SGSStep

    def spy(*args, **kwargs):
        seen["step"] = original(*args, **kwargs)
        return seen["step"]
    monkeypatch.setattr(dsnet.train.sgs, "SGSStep", spy)
    return seen


@pytest.mark.parametrize("unit", ["fraction", "gmadds"])
def test_the_complexity_term_prices_routes_in_the_configured_unit(tmp_path, monkeypatch, unit):
    run = train_supernet(tiny(tmp_path / "s", "train.epochs=1", "train.recalibrate_bn=false"))
    seen = _spy_sgs_step(monkeypatch)
    gate = train_gate(tiny(tmp_path / "g", f"gate.cost_unit={unit}", "train.max_steps_per_epoch=1"),
                      run / "checkpoints" / "last.pth")
    model = dsnet.load_checkpoint(gate / "checkpoints" / "last.pth")
    madds = torch.tensor(model.dynamic_costs((3, 32, 32)), dtype=torch.float32)
    expected = madds / 1e9 if unit == "gmadds" else madds / madds[-1]
    torch.testing.assert_close(seen["step"].route_costs, expected)


def _smoothed_ce(logits, y, eps):
    logp = logits.log_softmax(1)
    return ((1 - eps) * -logp.gather(1, y[:, None]).squeeze(1) - eps * logp.mean(1)).mean()


def test_stage_two_label_smoothing_applies_to_the_sgs_and_the_task_cross_entropy():
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, **SMALL).eval()
    torch.nn.init.normal_(model.gate.width_head.weight)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    step = SGSStep(model, torch.ones(len(model.routing_space)), rule="slimmest", sgs_weight=1.0, task_weight=1.0,
                   complexity_weight=0.0, complexity_target=0.0, gumbel_tau=1.0,
                   label_smoothing=0.1)
    torch.manual_seed(1)
    losses = step(x, y, torch.Generator(), lambda loss: None)["losses"]
    hidden, route_logits = frozen_forward(model, x)
    gate_logits = model.gate.width_head(hidden)
    torch.manual_seed(1)
    sample = F.gumbel_softmax(gate_logits, tau=1.0, hard=True)
    mixed = torch.einsum("br,rbk->bk", sample, route_logits)
    targets = route_targets(route_logits, y, "slimmest")
    torch.testing.assert_close(losses["sgs"], _smoothed_ce(gate_logits, targets, 0.1))
    torch.testing.assert_close(losses["task"], _smoothed_ce(mixed, y, 0.1))


def test_cooldown_epochs_run_after_the_schedule_at_min_lr(tmp_path):
    run = train_supernet(tiny(tmp_path, "train.epochs=1", "train.cooldown_epochs=1", "train.min_lr=0.001",
                              "train.log_interval=1", "train.recalibrate_bn=false"))
    assert read_checkpoint(run / "checkpoints" / "last.pth")["epoch"] == 2
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    cooldown = [r["lr"] for r in records if "lr" in r and r["epoch"] == 2]
    assert cooldown and all(lr == pytest.approx(0.001) for lr in cooldown)


def _evaluate(checkpoint, path, *extra):
    assert dsnet_main(["evaluate", str(checkpoint), "--json", str(path), *extra]) == 0
    report = json.loads(path.read_text())
    return {k: report[k] for k in ("static", "largest", "dynamic", "num_samples")}


def test_eval_ema_reports_the_ema_weights_in_both_stages(tmp_path):
    ema = ["ieb.teacher=ema", "train.eval_ema=true", "gate.ema_decay=0.5", "train.epochs=1"]
    run = train_supernet(tiny(tmp_path, *ema))
    gate = train_gate(tiny(tmp_path, *ema), run / "checkpoints" / "last.pth")
    state = read_checkpoint(gate / "checkpoints" / "last.pth")
    head = "width_head.weight"
    live_head, ema_head = ({k: v for k, v in state[w].items() if k.endswith(head)} for w in ("model", "ema"))
    assert live_head.keys() == ema_head.keys() and not any(torch.equal(live_head[k], ema_head[k]) for k in live_head)
    for sub in (run, gate):
        report = json.loads((sub / "eval.json").read_text())
        figures = {k: report[k] for k in ("static", "largest", "dynamic", "num_samples")}
        assert figures == _evaluate(sub / "checkpoints" / "last.pth", tmp_path / "e.json", "--ema")


def test_eval_ema_without_an_ema_stops_before_a_run_directory_exists(tmp_path):
    with pytest.raises(ValueError, match="train.eval_ema=true needs an EMA, but ieb.teacher=inplace"):
        train_supernet(tiny(tmp_path / "a", "ieb.teacher=inplace", "train.eval_ema=true"))
    assert not (tmp_path / "a").exists()


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_recalibration_averages_batches_equally_or_with_a_momentum(momentum):
    from dsnet.train.recalibrate import recalibrate_bn

    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, **SMALL)
    batches = [(torch.randn(4, 3, 32, 32) + i, None) for i in range(3)]
    stem = model.units[0]
    seen = []  # the stem BN's per-channel batch means on the largest route
    stem.bn.register_forward_pre_hook(lambda m, args: seen.append(args[0].mean((0, 2, 3))) if args[1] else None)
    recalibrate_bn(model, batches, torch.device("cpu"), 3, momentum=momentum)
    expected = torch.zeros_like(seen[0])
    for i, mean in enumerate(seen):
        expected = expected + ((mean - expected) / (i + 1) if momentum is None else momentum * (mean - expected))
    torch.testing.assert_close(stem.bn.running_mean[-1], expected)
    assert len(seen) == 3 and stem.bn.momentum == 0.1  # restored afterwards


@pytest.mark.parametrize("override,message", [
    ("gate.cost_unit=gmads", "gate.cost_unit must be one of fraction, gmadds"),
    ("train.cooldown_epochs=-1", "train.cooldown_epochs must be a non-negative integer"),
    ("train.recalibrate_momentum=0", r"train.recalibrate_momentum must be in \(0, 1\]"),
    ("gate.label_smoothing=1.5", r"gate.label_smoothing must be in \[0, 1\)"),
])
def test_the_release_keys_refuse_bad_values_naming_what_is_accepted(override, message):
    from dsnet.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])
