"""``dsnet evaluate``: a checkpoint's accuracy and MAdds on its run's validation data.

A supernet checkpoint gets every static subnet and the largest route, a stage-two checkpoint also
the dynamic model and its operating-point sweeps (``dsnet.train.evaluate``, the library training
calls every epoch); ``--target-madds`` writes a checkpoint shipping another operating point. A
static baseline checkpoint (``dsnet train-baseline``) gets its one row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from dsnet.config import check_root_used
from dsnet.errors import UserError
from dsnet.models.madds import parse_madds
from dsnet.models.policy import Policy
from dsnet.prune.static import baseline_report, load_static, static_cost
from dsnet.train.checkpoint import read_checkpoint, save_checkpoint
from dsnet.train.engine import autocast_factory, checkpoint_run, load_run
from dsnet.train.evaluate import (check_plot_path, evaluate_gated, evaluate_plain, evaluate_static, format_report,
                                  format_sweep_row, plot_report)
from dsnet.train.metrics import Progress
from dsnet.train.policy_select import target_policy
from dsnet.train.runs import build_val_loader, data_signature, write_eval

__all__ = ["check_classes", "evaluate_command", "evaluate_baseline"]


def check_classes(state: dict, classes: list[str]) -> None:
    """Refuse evaluation data whose classes are not those the checkpoint was trained on, naming
    the first class of the checkpoint's that is missing (and what stands in its place)."""
    trained = list(state.get("classes") or [])
    if state.get("classes") is None or trained == classes:
        return
    missing = [c for c in trained if c not in classes]
    extra = [c for c in classes if c not in trained]
    if missing and extra:
        what = f"class '{missing[0]}' of the checkpoint is not in the evaluation data, which has '{extra[0]}' instead"
    elif missing or extra:
        what = (f"the evaluation data has {len(classes)} classes, the checkpoint was trained on {len(trained)} ("
                + (f"'{missing[0]}' is missing)" if missing else f"'{extra[0]}' is new)"))
    else:
        first = next(i for i, (a, b) in enumerate(zip(classes, trained)) if a != b)
        what = f"class {first} is '{classes[first]}' in the evaluation data but '{trained[first]}' in the checkpoint"
    raise UserError(f"{what}; pass --data with the dataset it was trained on (class folders named as then)")


def evaluate_command(checkpoint: str, *, overrides: Sequence[str] = (), data_root: str | None = None,
                     json_path: str | None = None, plot: str | None = None, sweep: int = 0,
                     max_batches: int | None = None, ema: bool = False, target_madds: str | None = None,
                     deploy: str = "gate", output: str | None = None) -> None:
    """``dsnet evaluate``: every static subnet, the largest route and (stage two) the dynamic
    model of ``checkpoint`` on its run's validation data (``data_root`` and ``overrides`` applied
    to its config). Prints the report; writes ``json_path`` (eval.json format) and ``plot``; with
    ``target_madds`` writes a checkpoint shipping that operating point to ``output``."""
    _check_outputs(checkpoint, json_path, plot, sweep, max_batches)
    if read_checkpoint(checkpoint).get("stage") == "static":
        if sweep or plot or ema:
            raise UserError(f"{checkpoint} is a static baseline: --sweep, --plot and --ema need a supernet")
        return evaluate_baseline(checkpoint, overrides, data_root, json_path, max_batches)
    state, model, cfg, runtime = load_run(checkpoint, overrides, data_root, ema)
    check_root_used(cfg, data_root, overrides)
    if state["stage"] != "gate" and (sweep or target_madds):
        raise UserError(f"--sweep and --target-madds need a gate: {checkpoint} is a stage-one checkpoint "
                        "(run train_gate.py first)")
    out = None
    if target_madds is not None:
        target = parse_madds(target_madds)
        out = Path(output or Path(checkpoint).with_name(f"{Path(checkpoint).stem}-{target_madds}.pth"))
        if out.exists():
            raise UserError(f"{out} exists; choose another -o (dsnet never overwrites a checkpoint here)")
    loader, classes = build_val_loader(cfg, runtime)
    check_classes(state, classes)
    loader = Progress(loader, "evaluate", cfg.train.progress and runtime.is_main)
    size = (model.in_chans, cfg.data.input_size, cfg.data.input_size)
    autocast, _ = autocast_factory(cfg.train.amp, runtime.device)
    report = evaluate_static(model, loader, runtime.device, size, autocast, max_batches)
    report["data"], report["dynamic"] = data_signature(cfg, classes), None
    if state["stage"] == "gate":
        record = state.get("deploy")
        if out is not None:
            record = target_policy(model, loader, cfg, runtime, size, autocast, target, deploy, max_batches)
            model.set_policy(Policy.from_dict(record["policy"]))
        report.update(evaluate_gated(model, loader, runtime.device, size, cfg.gate.rule, autocast,
                                     max_batches, sweep or 9, cfg.gate.cascade_measure))
        if record:
            report["selection"] = record
    if not runtime.is_main:  # under torchrun every rank holds the whole set's figures
        return
    print(format_report(report))
    for row in report.get("sweep", []) + report.get("cascade", []):
        print(format_sweep_row(report, row))
    if out is not None:
        save_checkpoint({**{k: v for k, v in state.items() if k not in ("format", "version")}, "deploy": record}, out)
        print(f"checkpoint with this operating point -> {out}")
    _write_outputs(report, json_path, plot, f"{state['model_name']} ({Path(checkpoint).name})")


def _check_outputs(checkpoint: str, json_path: str | None, plot: str | None, sweep: int = 0,
                   max_batches: int | None = None) -> None:
    """Refuse, before any evaluation, a ``--plot`` matplotlib cannot write, a ``--json`` that is
    the run's own eval.json (RUN/eval.json of RUN/checkpoints/*.pth), which training wrote, and
    a negative ``--sweep`` or a ``--max-batches`` under 1 (which would report 0% of 0 images)."""
    if sweep < 0:
        raise UserError(f"--sweep must be >= 0 (0: the default 9 operating points), got {sweep}")
    if max_batches is not None and max_batches < 1:
        raise UserError(f"--max-batches must be >= 1, got {max_batches}")
    if plot:
        check_plot_path(plot)
    own = Path(checkpoint).resolve().parent.parent / "eval.json"
    if json_path and Path(json_path).resolve() == own and own.exists():
        raise UserError(f"--json {json_path} is the run's own result, written by training; dsnet evaluate never "
                        "overwrites it: choose another file")


def _write_outputs(report: dict, json_path: str | None, plot: str | None, title: str) -> None:
    if json_path:
        write_eval(Path(json_path), report)
    if plot:
        plot_report(report, plot, title=title)


def evaluate_baseline(checkpoint: str, overrides: Sequence[str] = (), data_root: str | None = None,
                      json_path: str | None = None, max_batches: int | None = None) -> None:
    """``dsnet evaluate`` of a static baseline checkpoint: its one row on the run's validation
    data (``data_root`` and ``overrides`` applied to its config); writes ``json_path`` if given."""
    state = read_checkpoint(checkpoint, "static")
    cfg, runtime = checkpoint_run(state, overrides, data_root)
    check_root_used(cfg, data_root, overrides)
    loader, classes = build_val_loader(cfg, runtime)
    check_classes(state, classes)
    model, supernet = load_static(state)
    cost = static_cost(state, supernet, (supernet.in_chans, cfg.data.input_size, cfg.data.input_size))
    loader = Progress(loader, "evaluate", cfg.train.progress and runtime.is_main)
    acc = evaluate_plain(model.to(runtime.device), loader, runtime.device,
                         autocast_factory(cfg.train.amp, runtime.device)[0], max_batches)
    report = {**baseline_report(state["subnet"], cost, acc), "baseline": state.get("baseline"),
              "data": data_signature(cfg, classes)}
    if not runtime.is_main:
        return
    print(format_report(report))
    if json_path:
        write_eval(Path(json_path), report)
