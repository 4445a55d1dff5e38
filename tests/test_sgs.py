"""Stage two: SGS targets on hand-made tables, the loss terms, and dynamic evaluation's bookkeeping."""
import pytest
import timm
import torch
from torch.testing import assert_close

import dsnet
from dsnet.evaluate import evaluate_dynamic, evaluate_gated
from dsnet.policy import cost_bias
from dsnet.sgs import SGSStep, complexity_penalty, sgs_targets

# Correctness of four routes (rows, slimmest first) on five samples (columns).
CORRECT = torch.tensor([[1, 0, 1, 0, 0],
                        [1, 0, 0, 1, 0],
                        [0, 0, 0, 1, 1],
                        [1, 1, 0, 0, 1]], dtype=torch.bool)


def test_published_rule_easy_to_slimmest_rest_to_widest():
    assert sgs_targets(CORRECT, "slimmest").tolist() == [0, 3, 0, 3, 3]


def test_largest_rule_sends_hopeless_samples_to_the_slimmest():
    assert sgs_targets(CORRECT, "slimmest_largest").tolist() == [0, 3, 0, 0, 3]


def test_cheapest_rule_targets_the_slimmest_correct_route():
    assert sgs_targets(CORRECT, "cheapest").tolist() == [0, 3, 0, 1, 2]
    assert sgs_targets(torch.zeros(3, 2, dtype=torch.bool), "cheapest").tolist() == [0, 0]  # none right


def test_unknown_rule_names_the_key():
    with pytest.raises(ValueError, match="gate.rule must be one of"):
        sgs_targets(CORRECT, "widest")


def test_balanced_weights_give_each_present_target_equal_total_weight():
    from dsnet.sgs import balanced_weights

    targets = torch.tensor([0, 0, 0, 3])
    w = balanced_weights(targets, 4)
    assert w[1] == 0 and w[2] == 0
    assert_close(w[targets].sum() / 2, w[0] * 3)  # class 0's total == class 3's total
    assert_close(w[0] * 3, w[3] * 1)
    assert_close(w[targets].sum(), torch.tensor(4.0))


def test_complexity_penalty_is_squared_excess_over_target():
    costs = torch.tensor([0.25, 0.5, 1.0])
    onehot = torch.eye(3)[[0, 2]]  # mean cost (0.25 + 1.0) / 2 = 0.625
    assert_close(complexity_penalty(onehot, costs, 0.0), torch.tensor(0.625 ** 2))
    assert_close(complexity_penalty(onehot, costs, 0.5), torch.tensor(0.125 ** 2))
    assert complexity_penalty(onehot, costs, 0.7) == 0


def _tiny(routing_space=(0, 1, 2)):
    torch.manual_seed(0)
    model = timm.create_model("ds_resnet20", num_classes=4, base_mults=(0.5, 1.0),
                              width_mults=(0.25, 0.5, 1.0), routing_space=routing_space)
    return model.eval()


def _spread_gate(model, loader):
    """A hand-set width head whose argmax varies across the loader's inputs: random directions
    over the gate's hidden features, centred on their mean and scaled by their spread."""
    from dsnet.sgs import frozen_forward

    hidden = torch.cat([frozen_forward(model, x)[0] for x, _ in loader])
    g = torch.Generator().manual_seed(3)
    weight = torch.randn(model.gate.width_head.out_features, hidden.shape[1], generator=g)
    weight = weight / (hidden @ weight.T).std(0)[:, None].clamp_min(1e-6)
    with torch.no_grad():
        model.gate.width_head.weight.copy_(weight)
        model.gate.width_head.bias.copy_(-(hidden.mean(0) @ weight.T))


def test_sgs_step_sends_gradients_to_the_width_head_only():
    model = _tiny()
    model.requires_grad_(False)
    model.gate.width_head.requires_grad_(True)
    step = SGSStep(model, "slimmest", 1.0, 1.0, 0.5, 0.0, 1.0, torch.tensor([0.2, 0.5, 1.0]))
    out = step(torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,)), torch.Generator(), lambda l: l.backward())
    assert set(out["losses"]) == {"sgs", "task", "complexity"}
    assert all(p.grad is None for n, p in model.named_parameters() if "width_head" not in n)
    assert model.gate.width_head.weight.grad.abs().sum() > 0


def test_zero_weights_turn_terms_off():
    model = _tiny()
    step = SGSStep(model, "slimmest", 1.0, 0.0, 0.0, 0.0, 1.0, torch.tensor([0.2, 0.5, 1.0]))
    out = step(torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,)), torch.Generator(), lambda l: None)
    assert set(out["losses"]) == {"sgs"}


def _loader(n=24, batch=8):
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 4, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def test_dynamic_evaluation_prices_each_sample_at_the_route_it_took():
    model, loader = _tiny(), _loader()
    _spread_gate(model, loader)
    size = (3, 32, 32)
    report = evaluate_dynamic(model, loader, torch.device("cpu"), size)
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
    assert report["routing"] == pytest.approx([taken.count(r) / len(taken) for r in range(3)])
    assert report["top1"] == pytest.approx(100.0 * sum(correct) / len(correct))


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
    from dsnet.evaluate import format_report, format_sweep_row, static_curve

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
