"""``dsnet compare --curves``: learning curves read from stage-one runs' metrics.jsonl."""
import json

import pytest

from dsnet.cli import main as dsnet_main
from dsnet.errors import UserError
from dsnet.report.compare import format_curves, learning_curves

pytest.importorskip("matplotlib")


def _run(root, name, tops, tail=""):
    """A finished stage-one run: eval.json, and metrics.jsonl with step records, one evaluated epoch
    per (slimmest, largest) pair, an unevaluated epoch, the final recalibrated evaluation (2 points
    up), a stage-two record, and ``tail``."""
    run = root / name
    run.mkdir(parents=True)
    static = lambda s: [{"subnet": 0, "madds": 1_000_000, "top1": s}, {"subnet": 1, "madds": 2_000_000, "top1": s + 1}]
    lines = [{"stage": "supernet", "epoch": 1, "step": 50, "loss": 2.0}]
    for epoch, (s, big) in enumerate(tops, start=1):
        lines.append({"stage": "supernet", "epoch": epoch, "train_loss_largest": 1.0,
                      "eval": {"static": static(s), "largest": {"madds": 3_000_000, "top1": big}, "num_samples": 10}})
        lines.append({"stage": "supernet", "epoch": epoch + 0.5, "train_loss_largest": 1.0})  # not evaluated
    s, big = tops[-1]
    lines.append({"stage": "supernet", "epoch": len(tops), "recalibrated": True,
                  "eval": {"static": static(s + 2), "largest": {"madds": 3_000_000, "top1": big + 2}}})
    lines.append({"stage": "gate", "epoch": 1, "eval": {"static": static(99.0), "largest": {"top1": 99.0}}})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + tail)
    (run / "eval.json").write_text(json.dumps({"static": static(s + 2), "largest": {"madds": 3_000_000, "top1": big + 2},
                                               "num_samples": 10}))
    return run


def test_curves_hold_each_runs_evaluated_epochs_of_stage_one_only(tmp_path, capsys):
    a = _run(tmp_path, "teacher-none", [(30.0, 40.0), (50.5, 60.25)], tail='{"stage": "superne')  # killed mid-line
    b = _run(tmp_path, "teacher-ensemble", [(20.0, 45.0), (55.0, 61.0)])
    curves = learning_curves([tmp_path])
    assert curves == [{"run": str(b), "epoch": [1, 2], "slimmest": [20.0, 55.0], "largest": [45.0, 61.0],
                       "final": {"slimmest": 57.0, "largest": 63.0}},
                      {"run": str(a), "epoch": [1, 2], "slimmest": [30.0, 50.5], "largest": [40.0, 60.25],
                       "final": {"slimmest": 52.5, "largest": 62.25}}]
    assert format_curves(curves[1:]).endswith("ep1 30.00/40.00  ep2 50.50/60.25  recalibrated 52.50/62.25")
    plot, out = tmp_path / "curves.png", tmp_path / "c.json"
    assert dsnet_main(["compare", str(a), str(b), "--curves", str(plot), "--json", str(out)]) == 0
    assert "Learning curves" in capsys.readouterr().out and plot.stat().st_size > 0
    assert json.loads(out.read_text())["curves"] == curves[::-1]  # in the order given


def test_curves_without_a_stage_one_run_or_with_a_bad_path_are_one_sentence(tmp_path, capsys):
    run = _run(tmp_path, "run", [(1.0, 2.0)])
    (run / "metrics.jsonl").write_text(json.dumps({"stage": "gate", "epoch": 1, "eval": {}}) + "\n")
    with pytest.raises(UserError, match="--curves: no stage-one run with an evaluated epoch under"):
        learning_curves([run])
    assert dsnet_main(["compare", str(run), "--curves", str(tmp_path / "nowhere" / "c.png")]) == 2
    assert "the folder" in capsys.readouterr().err and not (tmp_path / "nowhere").exists()
    assert dsnet_main(["compare", str(run), "--curves", str(tmp_path / "c.xyz")]) == 2
    assert "matplotlib cannot write '.xyz'" in capsys.readouterr().err
