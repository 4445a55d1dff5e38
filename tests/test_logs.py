"""Run logs: summary.csv beside metrics.jsonl (one row per epoch, one header across a resume),
and the optional TensorBoard writer."""
from __future__ import annotations

import csv
import json
import sys
import types

from dsnet.cli import main
from dsnet.train.logs import RunLog, append_summary
from tests.test_cli import QUICKSTART, one_error_line
from tests.test_runs import TINY, interrupt_after_first_epoch


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.reader(f))


def test_summary_csv_writes_its_header_once_and_widens_it_for_a_new_column(tmp_path):
    path = tmp_path / "summary.csv"
    append_summary(path, {"epoch": 1, "train_loss_largest": 2.5, "lr": 0.1})
    append_summary(path, {"epoch": 2, "train_loss_largest": 2.0, "lr": 0.05})
    assert read_csv(path) == [["epoch", "train_loss_largest", "lr"], ["1", "2.5", "0.1"], ["2", "2.0", "0.05"]]
    append_summary(path, {"epoch": 3, "train_loss_largest": 1.5, "top1": 40.0, "lr": 0.01})  # first evaluation
    assert read_csv(path) == [["epoch", "train_loss_largest", "top1", "lr"], ["1", "2.5", "", "0.1"],
                              ["2", "2.0", "", "0.05"], ["3", "1.5", "40.0", "0.01"]]
    append_summary(path, {"epoch": 4, "train_loss_largest": 1.0, "lr": 0.001})  # not evaluated: appended, blank
    assert read_csv(path)[0] == ["epoch", "train_loss_largest", "top1", "lr"]
    assert read_csv(path)[1:] == [["1", "2.5", "", "0.1"], ["2", "2.0", "", "0.05"], ["3", "1.5", "40.0", "0.01"],
                                  ["4", "1.0", "", "0.001"]]


def test_summary_csv_has_one_row_per_epoch_equal_to_metrics_jsonl_across_a_resume(tmp_path, monkeypatch):
    run = tmp_path / "run"
    args = ["train-supernet", "-c", QUICKSTART, *TINY, "train.epochs=2", f"output.dir={run}"]
    with monkeypatch.context() as m:
        interrupt_after_first_epoch(m)
        assert main(args) == 130  # interrupted after epoch 1's checkpoint and log
    assert len(read_csv(run / "summary.csv")) == 2
    assert main([*args, f"train.resume={run / 'checkpoints' / 'last.pth'}"]) == 0
    rows = read_csv(run / "summary.csv")
    header, rows = rows[0], rows[1:]
    assert header[0] == "epoch" and header[-1] == "lr" and "epoch" not in sum(rows, [])  # one header
    epochs = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
              if "train_time_s" in r and not r.get("recalibrated")]  # epoch records, not the final recalibration's
    assert [int(r[0]) for r in rows] == [e["epoch"] for e in epochs] == [1, 2]
    assert {"train_loss_largest", "top1_largest", "best_metric", "lr"} <= set(header)
    assert rows[0][header.index("top1_largest")] == ""  # quickstart evaluates at the last epoch only
    for row, record in zip(rows, epochs):
        for name, value in zip(header, row):
            assert float(value) == record[name] if value else name not in record, name


class FakeWriter:
    """Stands in for torch.utils.tensorboard.SummaryWriter: records what it is given."""

    made: list["FakeWriter"] = []

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars = log_dir, []
        FakeWriter.made.append(self)

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def test_tensorboard_gets_each_records_scalars_at_its_step(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=FakeWriter))
    log = RunLog(tmp_path, enabled=True, tensorboard=True)
    log.record({"stage": "supernet", "epoch": 1, "step": 4, "lr": 0.1, "loss": 3.0, "losses": {"largest": 1.0}})
    log.epoch({"stage": "supernet", "epoch": 1, "train_loss_largest": 1.5, "top1_largest": 30.0, "eval": {}, "lr": 0.1})
    writer = FakeWriter.made[-1]
    assert writer.log_dir == str(tmp_path / "tensorboard")
    assert writer.scalars == [("supernet/lr", 0.1, 4), ("supernet/loss", 3.0, 4), ("supernet/loss_largest", 1.0, 4),
                              ("supernet/train_loss_largest", 1.5, 1), ("supernet/top1_largest", 30.0, 1),
                              ("supernet/lr", 0.1, 1)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert read_csv(tmp_path / "summary.csv")[0] == ["epoch", "train_loss_largest", "top1_largest", "lr"]


def test_tensorboard_without_the_package_is_a_one_line_error_before_any_run_dir(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import -> ImportError
    run = tmp_path / "run"
    assert main(["train-supernet", "-c", QUICKSTART, *TINY, f"output.dir={run}", "output.tensorboard=true"]) == 2
    line = one_error_line(capsys, "dsnet train-supernet")
    assert "output.tensorboard=true needs the tensorboard package: pip install 'dsnet[tensorboard]'" in line
    assert not run.exists()


def test_a_non_main_rank_writes_no_logs(tmp_path):
    log = RunLog(tmp_path, enabled=False, tensorboard=True)  # no writer either: nothing imported
    log.epoch({"stage": "supernet", "epoch": 1, "lr": 0.1})
    assert list(tmp_path.iterdir()) == []
