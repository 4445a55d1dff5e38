"""The release-recipe config against the DS-Net release's own training steps on one fixed batch
(``tests/fixtures/ds_net_release_losses.json``, recorded by running the release's
``train_epoch_slim`` and ``train_epoch_slim_gate``, docs/results.md): the same weights
(``loss_state_dict``, converted with ``dsnet convert --from ds-net-release``), the same images
and labels, the subnets and the Gumbel noise the release drew, and dsnet's steps built from
``configs/imagenet_ds_mobilenet_v1_release.yml`` as ``train_supernet.py`` / ``train_gate.py``
build them. Dropout is off on both sides (a random mask; the release's 0.2 is on the largest
route only in both trainers).

Stage one: the largest route's label-smoothed CE, the two random subnets' and the slimmest's
soft-target CE against the EMA largest (``ieb.teacher=ema``; the EMA is the model at step 0, in
eval mode). Stage two: the SGS targets, the gate's logits, the Gumbel-routed task CE, the
complexity term and the total; the two terms that differ by design are checked as the
departures docs/design.md lists (rows 9 and 22).
"""
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

import dsnet
from dsnet.cli import main as dsnet_main
from dsnet.config import load_config
from dsnet.train.stage_two import build_sgs_step
from dsnet.train.runs import build_ieb_step
from tests.release_fixture import load_fixture, load_losses, loss_batch, loss_state_dict

ROOT = Path(__file__).resolve().parents[1]
RELEASE_CONFIG = ROOT / "configs" / "imagenet_ds_mobilenet_v1_release.yml"
REL = 1e-4


@pytest.fixture(scope="module")
def recorded():
    return load_losses()


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The loss fixture's weights as a release checkpoint, converted to a dsnet supernet."""
    folder = tmp_path_factory.mktemp("release_losses")
    torch.save({"state_dict": loss_state_dict(load_fixture())}, folder / "release.pth.tar")
    assert dsnet_main(["convert", str(folder / "release.pth.tar"), "-o", str(folder / "ds.pth"),
                       "--from", "ds-net-release"]) == 0
    return folder / "ds.pth"


@pytest.fixture(scope="module")
def cfg():
    return load_config(RELEASE_CONFIG)


def test_stage_one_losses_equal_the_release_on_its_sampled_subnets(recorded, converted, cfg):
    one = recorded["stage_one"]
    model = dsnet.load_checkpoint(converted)
    assert model.drop_rate == 0.0
    ema = timm.utils.ModelEmaV3(model, decay=cfg.ieb.ema_decay).module  # as train_supernet builds it
    model.train()
    step = build_ieb_step(cfg, model, model, ema)
    assert cfg.ieb.num_random == len(one["random_subnets"]) == 2
    plan = [model.routes.largest, *map(model.routes.static, one["random_subnets"]), model.routes.static(0)]
    x, y = loss_batch(recorded)
    out = step(x, y, torch.Generator(), lambda loss: None, plan=plan)  # the losses, not their gradients
    expected = {"largest": one["largest"], "random0": one["random"][0], "random1": one["random"][1],
                "slimmest": one["slimmest"]}
    assert {k: float(v) for k, v in out["losses"].items()} == pytest.approx(expected, rel=REL)
    assert out["routes"] == plan
    assert len(set(expected.values())) == 4 and min(expected.values()) > 3.0  # far from log(10): sensitive


def _release_gumbel(noise: torch.Tensor, tau: float):
    """The release's straight-through sample: argmax of (logits + noise) / tau, its softmax's gradient."""
    def sample(logits: torch.Tensor) -> torch.Tensor:
        soft = torch.softmax((logits + noise) / tau, 1)
        return F.one_hot(soft.argmax(1), soft.shape[1]).to(soft.dtype) - soft.detach() + soft
    return sample


def _release_depthwise_overcount(route: int, size: int) -> int:
    """MAdds the release's training-time counter adds for routing-space route ``route`` of
    DS-MBNet at ``size`` px (docs/design.md, departures row 22): a depthwise conv after the gate
    is priced w x w x 9 x H x W / 224 (its group count left at the slimmest width by the
    targets' forward) instead of w x 9 x H x W. Five such convs in the gated stage (width
    224 + 32 r, at size/16 px), the next stage's two (widths 224 + 32 r and 736 + 32 r, over
    groups 224 and 736, at size/32 px)."""
    w, w5 = 224 + 32 * route, 736 + 32 * route
    hw4, hw5 = (size // 16) ** 2, (size // 32) ** 2
    over = 5 * 9 * hw4 * w * (w - 224) / 224 + 9 * hw5 * w * (w - 224) / 224 + 9 * hw5 * w5 * (w5 - 736) / 736
    return round(over)


def test_stage_two_losses_equal_the_release_with_its_gumbel_sample(recorded, converted, cfg):
    two, size = recorded["stage_two"], recorded["batch"]["input_size"]
    model = dsnet.load_checkpoint(converted)
    model.set_routing_space(cfg.gate.routing_space)
    model.requires_grad_(False).gate.width_head.requires_grad_(True)
    noise = torch.tensor(two["gumbel_noise"])
    step = build_sgs_step(cfg, model, (3, size, size), "cpu", sampler=_release_gumbel(noise, cfg.gate.gumbel_tau))
    x, y = loss_batch(recorded)
    hidden, route_logits = step.frozen_forward(x)
    gate_logits = model.gate.width_head(hidden).detach()
    release_logits, targets = torch.tensor(two["gate_logits"]), torch.tensor(two["gate_targets"])
    assert float((gate_logits - release_logits).abs().max()) <= REL * float(release_logits.abs().max())
    assert step.targets(route_logits, y).tolist() == two["gate_targets"] and 0 < targets.sum() < 3 * len(targets)
    routes = (gate_logits + noise).argmax(1)
    assert routes.tolist() == two["route"] and len(set(two["route"])) >= 3

    out = step(x, y, torch.Generator(), lambda loss: loss.backward())
    losses = {k: float(v) for k, v in out["losses"].items()}
    assert losses["task"] == pytest.approx(two["task_ce"], rel=REL)
    # row 9: the release takes the SGS CE on the Gumbel softmax's probabilities; dsnet on the logits
    release_form = F.cross_entropy(torch.softmax(gate_logits + noise, 1), targets, label_smoothing=0.1)
    assert float(release_form) == pytest.approx(two["gate_ce"], rel=REL)
    assert losses["sgs"] == pytest.approx(float(F.cross_entropy(release_logits, targets, label_smoothing=0.1)), rel=REL)
    # row 22: the release's per-sample MAdds are dsnet's route costs plus its depthwise over-count
    costs = model.dynamic_costs((3, size, size))
    assert costs[0] == min(two["madds"])
    priced = [costs[r] + _release_depthwise_overcount(r, size) for r in two["route"]]
    assert all(abs(p - m) <= 2 for p, m in zip(priced, two["madds"])), (priced, two["madds"])  # float32 sums
    unpriced = [m - _release_depthwise_overcount(r, size) for m, r in zip(two["madds"], two["route"])]
    assert losses["complexity"] == pytest.approx((sum(unpriced) / len(unpriced) / 1e9) ** 2, rel=REL)
    # the total weighs them 1, 1, 0.5 (the complexity term is ~1e-5 of it: its weight is read off the rest)
    assert float(out["loss"]) == pytest.approx(losses["sgs"] + two["task_ce"] + 0.5 * losses["complexity"], rel=REL)
    assert float(out["loss"]) - losses["sgs"] - losses["task"] == pytest.approx(0.5 * losses["complexity"], rel=0.02)


def test_stage_two_takes_a_converted_release_under_the_release_config(converted, cfg):
    """The converted checkpoint was not built with ``init=timm``; how weights were initialised
    does not matter once they are loaded, while a different architecture is still refused."""
    from dsnet.train.checkpoint import read_checkpoint
    from dsnet.config import replace
    from dsnet.train.stage_two import check_supernet

    state = read_checkpoint(converted, "supernet")
    assert "init" not in state["model_kwargs"] and cfg.model.kwargs["init"] == "timm"
    check_supernet(cfg, state, converted, [str(c) for c in range(10)])
    with pytest.raises(ValueError, match="was built with"):
        check_supernet(replace(cfg, **{"model.kwargs": {**cfg.model.kwargs, "in_chans": 1}}), state, converted, [])
