"""What a run writes for people to read while it goes: ``train.log``, ``metrics.jsonl``,
``summary.csv`` and, with ``output.tensorboard=true``, TensorBoard event files.

- ``train.log``: what the console showed while the stage ran (``ConsoleLog``): every log line, each
  with its time, the final table, and the error that stopped the stage; not the progress bars. A
  resumed run appends to it.
- Progress bars (``progress_bar``) go to stderr only when it is a terminal.

- ``metrics.jsonl``: one JSON object per logged step and per epoch (DESIGN.md's contract).
- ``summary.csv``: one row per epoch, as timm's ``train.py`` writes it: ``epoch``, the epoch's
  scalar metrics (train losses, evaluation accuracies), ``lr`` last. The header is written once;
  a resumed run appends below it. When a later epoch brings a column the header lacks (the first
  evaluated epoch of a run with ``train.eval_interval`` > 1), the file is rewritten with the wider
  header, earlier rows left blank in that column.
- ``tensorboard/``: the same scalars, tagged ``<stage>/<name>``, step records at the optimizer
  step, epoch records at the epoch.
"""
from __future__ import annotations

import csv
import json
import logging
import os
import traceback
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dsnet.errors import UserError

__all__ = ["RunLog", "ConsoleLog", "check_tensorboard", "append_summary", "scalars", "progress_bar"]


def progress_bar(total: int | None, desc: str, enabled: bool, **kwargs) -> tqdm:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal: a run whose
    output goes to a file (nohup, a job scheduler) gets its log lines, not every frame of a bar."""
    return tqdm(total=total, desc=desc, disable=None if enabled else True, leave=False, dynamic_ncols=True, **kwargs)


def check_tensorboard(enabled: bool) -> None:
    """Refuse ``output.tensorboard=true`` when the tensorboard package is missing (before a run
    creates anything)."""
    if not enabled:
        return
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise UserError("output.tensorboard=true needs the tensorboard package: "
                        "pip install 'dsnet[tensorboard]' (or set output.tensorboard=false)") from None


def scalars(record: dict) -> dict[str, float | int]:
    """The numeric entries of a metrics record, nested ``losses`` flattened as ``loss_<name>``."""
    out: dict[str, float | int] = {}
    for key, value in record.items():
        if key == "losses" and isinstance(value, dict):
            out.update({f"loss_{k}": v for k, v in value.items() if _number(v)})
        elif _number(value):
            out[key] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def append_summary(path: Path, row: dict) -> None:
    """Append ``row`` to the csv at ``path``, writing the header when the file is new and
    rewriting the file when ``row`` brings a column the header lacks."""
    header: list[str] = []
    if path.exists():
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
    if header and set(row) <= set(header):
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=header, restval="").writerow(row)
        return
    rows = []
    if header:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    fields = header + [k for k in row if k not in header]
    if "lr" in fields:  # timm's order: lr last
        fields = [k for k in fields if k != "lr"] + ["lr"]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows + [row])
    os.replace(tmp, path)


class RunLog:
    """The run's logs, written by the main process only (``enabled``)."""

    def __init__(self, run_dir: Path, enabled: bool = True, tensorboard: bool = False) -> None:
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if enabled and tensorboard:
            check_tensorboard(True)
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def record(self, record: dict) -> None:
        """One ``metrics.jsonl`` line (a step or epoch record), mirrored to TensorBoard."""
        if not self.enabled:
            return
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            stage = record.get("stage", "train")
            at = record["step"] if "step" in record else record.get("epoch", 0)
            for name, value in scalars(record).items():
                if name not in ("epoch", "step"):
                    self.writer.add_scalar(f"{stage}/{name}", value, at)
            self.writer.flush()

    def epoch(self, record: dict) -> None:
        """An epoch's record: ``metrics.jsonl`` and TensorBoard as ``record``, plus a
        ``summary.csv`` row (``epoch`` first, ``lr`` last)."""
        self.record(record)
        if self.enabled:
            values = scalars(record)
            row = {"epoch": values.pop("epoch", None), **values}
            append_summary(self.run_dir / "summary.csv", row)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class ConsoleLog:
    """``with ConsoleLog(run_dir / "train.log", enabled):`` copies what the console shows into the
    file: the records that reach the root logger's handlers (what ``logging`` prints: INFO and up
    under the ``dsnet`` command), the text given to ``print``, and the error that ends the block:
    one line for the ``brief`` kinds (those the command prints on one line), else its traceback.
    ``enabled``: the main process only."""

    def __init__(self, path: Path, enabled: bool = True, brief: tuple[type, ...] = (UserError, OSError)) -> None:
        self.path, self.enabled, self.brief = Path(path), enabled, brief
        self.handler: logging.Handler | None = None

    def __enter__(self) -> ConsoleLog:
        if self.enabled:
            self.handler = logging.FileHandler(self.path, mode="a", encoding="utf-8")
            self.handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
            logging.getLogger().addHandler(self.handler)
        return self

    def print(self, text: str) -> None:
        """Print ``text`` and write it to the file as it is."""
        print(text)
        if self.handler is not None:
            self.handler.acquire()
            try:
                self.handler.stream.write(text + "\n")
                self.handler.flush()
            finally:
                self.handler.release()

    def __exit__(self, kind: type | None, err: BaseException | None, tb: Any) -> None:
        if self.handler is None:
            return
        if kind is KeyboardInterrupt:
            self.handler.stream.write("interrupted; the last checkpoint is kept\n")
        elif isinstance(err, self.brief):
            self.handler.stream.write(f"error: {err}\n")
        elif err is not None:
            self.handler.stream.write("".join(traceback.format_exception(kind, err, tb)))
        logging.getLogger().removeHandler(self.handler)
        self.handler.close()
        self.handler = None
