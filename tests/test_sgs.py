"""Stage two: SGS targets on hand-made tables, the loss terms, and dynamic evaluation's bookkeeping."""
import pytest
import timm
import torch
from torch.testing import assert_close

import dsnet
from dsnet.train.evaluate import evaluate_dynamic, evaluate_gated
from dsnet.train.policy_select import cost_bias
from dsnet.train.sgs import SGSStep, complexity_penalty, sgs_targets

# Correctness of four routes (rows, slimmest first) on five samples (columns).
CORRECT = torch.tensor([[1, 0, 1, 0, 0],
                        [1, 0, 0, 1, 0],
                        [0, 0, 0, 1, 1],
                        [1, 1, 0, 0, 1]], dtype=torch.bool)


def test_published_rule_easy_to_slimmest_rest_to_widest():
    assert sgs_targets(CORRECT, "slimmest").tolist() == [0, 3, 0, 3, 3]


def test_largest_rule_sends_hopeless_samples_to_the_slimmest():
    assert sgs_targets(CORRECT, "slimmest_largest").tolist() == [0, 3, 0, 0, 3]
    # the slimmest right where the next route is wrong: the slimmest's row decides, not the next one's
    one = torch.tensor([[1, 0], [0, 1], [0, 0], [1, 1]], dtype=torch.bool)
    assert sgs_targets(one, "slimmest_largest").tolist() == [0, 3]


def test_cheapest_rule_targets_the_slimmest_correct_route():
    assert sgs_targets(CORRECT, "cheapest").tolist() == [0, 3, 0, 1, 2]
    assert sgs_targets(torch.zeros(3, 2, dtype=torch.bool), "cheapest").tolist() == [0, 0]  # none right


def test_unknown_rule_names_the_key():
    with pytest.raises(ValueError, match="gate.rule must be one of"):
        sgs_targets(CORRECT, "widest")


def test_balanced_weights_give_each_present_target_equal_total_weight():
    from dsnet.train.sgs import balanced_weights

    targets = torch.tensor([0, 0, 0, 3])
    w = balanced_weights(targets, 4)
    assert w[1] == 0 and w[2] == 0
    assert_close(w[targets].sum() / 2, w[0] * 3)  # class 0's total == class 3's total
    assert_close(w[0] * 3, w[3] * 1)
    assert_close(w[targets].sum(), torch.tensor(4.0))


def test_soft_targets_are_the_rules_outcome_probabilities():
    from dsnet.train.sgs import route_targets, soft_sgs_targets

    for rule in ("slimmest", "slimmest_largest", "cheapest"):  # 0/1 probabilities: the one-hot rules
        soft = soft_sgs_targets(CORRECT.float(), rule)
        assert soft.argmax(1).tolist() == sgs_targets(CORRECT, rule).tolist()
        assert_close(soft.max(1).values, torch.ones(5))
    p = torch.tensor([[0.5], [0.25], [0.5]])  # three routes right with these probabilities
    assert_close(soft_sgs_targets(p, "slimmest"), torch.tensor([[0.5, 0.0, 0.5]]))
    # cheapest: route 0 right, or only route 1 right first, or route 2 first; nobody right -> route 0
    assert_close(soft_sgs_targets(p, "cheapest"), torch.tensor([[0.5 + 0.5 * 0.75 * 0.5, 0.5 * 0.25, 0.5 * 0.75 * 0.5]]))
    assert_close(soft_sgs_targets(p, "slimmest_largest"), torch.tensor([[0.75, 0.0, 0.25]]))
    with pytest.raises(ValueError, match="gate.rule must be one of"):
        soft_sgs_targets(p, "widest")
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(3, 6, 4, generator=g), torch.randint(0, 4, (6,), generator=g)
    p_true = torch.softmax(logits, 2)[:, torch.arange(6), y]  # [R, B]
    soft = route_targets(logits, y, "cheapest", soft=True)
    assert_close(soft, torch.stack([p_true[0] + (1 - p_true[0]) * (1 - p_true[1]) * (1 - p_true[2]),
                                    p_true[1] * (1 - p_true[0]), p_true[2] * (1 - p_true[0]) * (1 - p_true[1])], 1))
    assert route_targets(logits, y, "cheapest").tolist() == sgs_targets(logits.argmax(2) == y, "cheapest").tolist()


def test_balanced_weights_count_soft_targets_by_their_mass():
    from dsnet.train.sgs import balanced_weights

    soft = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.0, 0.5, 0.5]])  # masses 1.5, 1.0, 0.5
    assert balanced_weights(soft, 3).tolist() == pytest.approx([1 / 1.5, 1 / 1.0, 1 / 0.5])
    assert balanced_weights(torch.tensor([2, 2]), 3).tolist() == pytest.approx([0.0, 0.0, 1.0])  # one target


def test_balanced_weights_cover_every_route_when_the_widest_is_absent():
    from dsnet.train.sgs import balanced_weights

    w = balanced_weights(torch.tensor([0, 0, 1]), 4)
    assert w.tolist() == pytest.approx([0.75, 1.5, 0.0, 0.0])  # 3 samples / 2 present targets / count


def test_complexity_penalty_is_squared_excess_over_target():
    costs = torch.tensor([0.25, 0.5, 1.0])
    onehot = torch.eye(3)[[0, 2]]  # mean cost (0.25 + 1.0) / 2 = 0.625
    assert_close(complexity_penalty(onehot, costs, 0.0), torch.tensor(0.625 ** 2))
    assert_close(complexity_penalty(onehot, costs, 0.5), torch.tensor(0.125 ** 2))
    assert complexity_penalty(onehot, costs, 0.7) == 0


def _tiny(routing_space=(0, 1, 2), width_mults=(0.25, 0.5, 1.0)):
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.5, 1.0),
                              width_mults=width_mults, routing_space=routing_space)
    return model.eval()


# a routing space that is not 0..R-1: entry i is static subnet space[i], not subnet i
SPACES = {"all": ((0, 1, 2), (0.25, 0.5, 1.0)), "gapped": ((1, 3), (0.25, 0.5, 0.75, 1.0))}


def _spread_gate(model, loader):
    """A hand-set width head whose argmax varies across the loader's inputs (``bench.spread_gate``)."""
    from dsnet.deploy.bench import spread_gate

    with torch.no_grad():
        spread_gate(model, torch.cat([x for x, _ in loader]))


def test_sgs_step_sends_gradients_to_the_width_head_only():
    model = _tiny()
    model.requires_grad_(False)
    model.gate.width_head.requires_grad_(True)
    step = SGSStep(model, torch.tensor([0.2, 0.5, 1.0]), rule="slimmest", sgs_weight=1.0, task_weight=1.0,
                   complexity_weight=0.5, complexity_target=0.0, gumbel_tau=1.0)
    out = step(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)), torch.Generator(), lambda l: l.backward())
    assert set(out["losses"]) == {"sgs", "task", "complexity"}
    assert all(p.grad is None for n, p in model.named_parameters() if "width_head" not in n)
    assert model.gate.width_head.weight.grad.abs().sum() > 0


def test_zero_weights_turn_terms_off():
    model = _tiny()
    step = SGSStep(model, torch.tensor([0.2, 0.5, 1.0]), rule="slimmest", sgs_weight=1.0, task_weight=0.0,
                   complexity_weight=0.0, complexity_target=0.0, gumbel_tau=1.0)
    out = step(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,)), torch.Generator(), lambda l: None)
    assert set(out["losses"]) == {"sgs"}


def _loader(n=24, batch=8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("space", SPACES)
def test_dynamic_evaluation_prices_each_sample_at_the_route_it_took(space):
    model, loader = _tiny(*SPACES[space]), _loader()
    _spread_gate(model, loader)
    size = (3, 32, 32)
    num_routes = len(model.routing_space)
    report = evaluate_dynamic(model, loader, torch.device("cpu"), size, targets_fn=lambda x, y: y % num_routes)
    head = model.gate.width_head.in_features * model.gate.width_head.out_features
    taken, correct = [], []
    with torch.no_grad():
        for x, y in loader:
            choice = model.forward_gate(x)[1].argmax(1)
            for xi, yi, c in zip(x, y, choice.tolist()):
                subnet = model.routing_space[c]
                taken.append(c)
                correct.append(int(model(xi[None], subnet=subnet).argmax(1).item() == yi.item()))
                assert model.dynamic_costs(size)[c] == dsnet.count_madds(model, subnet, size) + head
    assert len(set(taken)) >= 2, "the hand-set gate should use several routes"
    expected = sum(dsnet.count_madds(model, model.routing_space[c], size) + head for c in taken) / len(taken)
    assert report["madds_mean"] == pytest.approx(expected, rel=1e-12)
    assert report["routing"] == pytest.approx([taken.count(r) / len(taken) for r in range(num_routes)])
    assert report["top1"] == pytest.approx(100.0 * sum(correct) / len(correct))
    labels = torch.cat([y for _, y in loader]).tolist()
    hits = sum(c == label % num_routes for c, label in zip(taken, labels))
    assert report["gate_accuracy"] == pytest.approx(100.0 * hits / len(taken))


def test_dynamic_costs_price_routing_space_entries_not_static_subnets():
    model, size = _tiny(*SPACES["gapped"]), (3, 16, 16)
    head = model.gate.width_head.in_features * model.gate.width_head.out_features
    subnet_cost = [dsnet.count_madds(model, i, size) for i in range(4)]
    assert len(set(subnet_cost)) == 4
    assert model.dynamic_costs(size) == [subnet_cost[1] + head, subnet_cost[3] + head]


def test_sweep_at_zero_strength_equals_the_routed_evaluation_and_trades_cost_monotonically():
    model, loader, size = _tiny(), _loader(), (3, 32, 32)
    _spread_gate(model, loader)
    report = evaluate_dynamic(model, loader, torch.device("cpu"), size)
    gated = evaluate_gated(model, loader, torch.device("cpu"), size, "slimmest", sweep=3)
    rows = [gated["gate"], *gated["sweep"]]  # the trained gate, then strengths -3, 0, +3
    assert [r["strength"] for r in rows[1:]] == [-3.0, 0.0, 3.0]
    for row in rows[:1] + rows[2:3]:
        assert row["top1"] == pytest.approx(report["top1"]) and row["madds_mean"] == pytest.approx(report["madds_mean"])
    assert gated["dynamic"]["top1"] == pytest.approx(report["top1"])
    assert rows[1]["madds_mean"] >= rows[2]["madds_mean"] >= rows[3]["madds_mean"]
    costs = model.dynamic_costs(size)
    assert cost_bias(costs, 1.0)[0] == 0.0 and cost_bias(costs, 1.0)[-1] == -1.0


def test_report_places_the_dynamic_model_and_sweep_points_against_the_static_curve():
    from dsnet.train.evaluate import format_report, format_sweep_row, static_curve

    report = {"static": [{"subnet": 1, "madds": 30, "params": 1, "top1": 70.0, "top5": 90.0},
                         {"subnet": 0, "madds": 10, "params": 1, "top1": 50.0, "top5": 80.0},
                         {"subnet": 2, "madds": 40, "params": 1, "top1": 72.0, "top5": 91.0}],
              "largest": {"madds": 80, "top1": 75.0},
              "dynamic": {"top1": 64.0, "top5": 85.0, "madds_mean": 25.0, "routing": [0.25, 0.75, 0.0],
                          "gate_accuracy": 60.0},
              "num_samples": 4}
    assert static_curve(report, 25) == 65.0  # between subnets 0 and 1, whatever their order
    assert static_curve(report, 35) == 71.0
    assert static_curve(report, 10) == 50.0 and static_curve(report, 40) == 72.0
    assert static_curve(report, 5) is None and static_curve(report, 60) is None  # the largest is no subnet
    assert "(static curve 65.00, -1.00)" in format_report(report)
    row = {"strength": 1.0, "top1": 72.5, "madds_mean": 35.0}
    assert format_sweep_row(report, row).endswith("top-1 72.50 (static curve 71.00, +1.50)")
    cascade = {"threshold": 0.5, "escalated": 0.25, "top1": 64.5, "madds_mean": 25.0}
    assert format_sweep_row(report, cascade) == "cascade 25.0% escalated: 0.00 M MAdds, top-1 64.50 (static curve 65.00, -0.50)"
    assert "static curve" not in format_sweep_row(report, {**row, "madds_mean": 90.0})


@pytest.mark.parametrize("weights, balance, smoothing", [((1.0, 2.0, 4.0), False, 0.0), ((1.0, 2.0, 4.0), True, 0.0),
                                                        ((0.0, 0.5, 0.0), False, 0.0), ((0.0, 0.0, 0.5), False, 0.0),
                                                        ((1.0, 0.0, 0.0), False, 0.0), ((1.0, 2.0, 0.0), False, 0.1)])
def test_sgs_step_with_a_fixed_sample_gives_the_chosen_routes_task_loss_and_cost_penalty(
        monkeypatch, weights, balance, smoothing):
    """A one-hot Gumbel sample picks each sample's route: the task term is the CE of that route's
    logits, the complexity term the squared excess of the picked routes' mean cost; a term with
    weight 0 is absent."""
    import torch.nn.functional as F

    model, (space, _) = _tiny(*SPACES["gapped"]), SPACES["gapped"]
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(6, 3, 16, 16, generator=g), torch.randint(0, 4, (6,), generator=g)
    with torch.no_grad():  # a gate whose logits differ per sample, so the SGS weights matter
        model.gate.width_head.weight.normal_(generator=g)
    choice = torch.tensor([0, 1, 1, 0, 1, 1])  # reversing the sample's columns changes every pick
    calls = []

    def one_hot_sample(logits, tau, hard):
        calls.append((tau, hard))
        return F.one_hot(choice, logits.shape[1]).float() + 0 * logits

    monkeypatch.setattr("dsnet.train.sgs.F.gumbel_softmax", one_hot_sample)
    costs = torch.tensor([0.25, 1.0])
    step = SGSStep(model, costs, rule="slimmest", **dict(zip(("sgs_weight", "task_weight", "complexity_weight"), weights)),
                   complexity_target=0.3, gumbel_tau=0.7, balance=balance, label_smoothing=smoothing)
    out = step(x, y, torch.Generator(), lambda loss: None)
    assert calls == ([(0.7, True)] if weights[1] or weights[2] else [])
    with torch.no_grad():
        logits = torch.stack([model(x, subnet=s) for s in space])  # [R, B, K], plain forwards
        task = F.cross_entropy(logits[choice, torch.arange(6)], y, label_smoothing=smoothing)
        targets = torch.where(logits[0].argmax(1) == y, 0, len(space) - 1)
        logp = F.log_softmax(model.forward_gate(x)[1], 1)
        nll = -(1 - smoothing) * logp[torch.arange(6), targets] - smoothing * logp.mean(1)
        share = torch.tensor([1.0 / (targets == t).sum() for t in targets])  # each target's total: 1
        sgs = (nll * share).sum() / share.sum() if balance else nll.mean()
    if balance:
        assert len(set(targets.tolist())) == 2 and (targets == 0).sum() != 3  # the weights matter
    excess = (4 * 1.0 + 2 * 0.25) / 6 - 0.3
    expected = {"sgs": sgs, "task": task, "complexity": torch.tensor(excess ** 2)}
    expected = {k: v for k, v, w in zip(expected, expected.values(), weights) if w > 0}
    assert out["losses"].keys() == expected.keys()
    for k in expected:
        assert_close(out["losses"][k], expected[k], msg=k)
    assert_close(out["loss"], sum(w * expected[k] for k, w in zip(["sgs", "task", "complexity"], weights) if w > 0))


def test_sgs_step_with_soft_targets_fits_the_gate_to_the_rules_probabilities():
    import torch.nn.functional as F

    from dsnet.train.sgs import soft_sgs_targets

    model, g = _tiny(), torch.Generator().manual_seed(1)
    x, y = torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 4, (5,), generator=g)
    with torch.no_grad():
        model.gate.width_head.weight.normal_(generator=g)
        logits = torch.stack([model(x, subnet=s) for s in (0, 1, 2)])  # [R, B, K]
        soft = soft_sgs_targets(torch.softmax(logits, 2)[:, torch.arange(5), y], "slimmest")
        expected = -(soft * F.log_softmax(model.forward_gate(x)[1], 1)).sum(1).mean()
    step = SGSStep(model, torch.tensor([0.25, 0.5, 1.0]), rule="slimmest", sgs_weight=1.0, task_weight=0.0,
                   complexity_weight=0.0, complexity_target=0.0, gumbel_tau=1.0, soft_targets=True)
    assert_close(step(x, y, torch.Generator(), lambda loss: None)["losses"]["sgs"], expected)


def test_sgs_step_runs_the_frozen_routes_under_its_autocast():
    import contextlib

    entered = []

    @contextlib.contextmanager
    def autocast():
        entered.append(True)
        yield

    model = _tiny()
    step = SGSStep(model, torch.tensor([0.25, 0.5, 1.0]), rule="slimmest", sgs_weight=1.0, task_weight=0.0,
                   complexity_weight=0.0, complexity_target=0.0, gumbel_tau=1.0, autocast=autocast)
    step(torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3]), torch.Generator(), lambda loss: None)
    assert entered == [True]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_stage_two_under_torchrun_averages_the_width_heads_gradients_over_ranks(tmp_path):
    """The width head is trained outside DDP, so SGSStep all-reduces its gradients by hand: every
    rank ends with the mean of the per-rank gradients, as one process on the global batch would."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29561",
           str(root / "tests" / "ddp_sgs_worker.py"), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for rank in (0, 1):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        a, b = got["alone"]
        assert not torch.allclose(a["weight"], b["weight"])  # the ranks' batches disagree
        for name, grad in got["together"].items():
            assert_close(grad, (a[name] + b[name]) / 2)


def test_sgs_kwargs_feed_the_step_every_loss_setting_of_the_gate_section():
    import dataclasses

    from dsnet.config import GateConfig, load_config
    from dsnet.train.sgs import sgs_kwargs

    gate = load_config(None, ["gate.rule=cheapest", "gate.sgs_weight=2", "gate.task_weight=3", "gate.complexity_weight=4",
                              "gate.complexity_target=0.25", "gate.gumbel_tau=0.5", "gate.balance=false",
                              "gate.soft_targets=true", "gate.label_smoothing=0.1"]).gate
    kwargs = sgs_kwargs(gate)
    assert set(kwargs) <= {f.name for f in dataclasses.fields(GateConfig)}
    step = SGSStep(_tiny(), torch.tensor([0.25, 0.5, 1.0]), **kwargs)
    assert (step.rule, step.tau, step.balance, step.soft_targets, step.label_smoothing) == ("cheapest", 0.5, False, True, 0.1)
    assert step.weights == {"sgs": 2.0, "task": 3.0, "complexity": 4.0} and step.complexity_target == 0.25
