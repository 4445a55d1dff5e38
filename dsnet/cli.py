"""The ``dsnet`` command: profile, evaluate, recalibrate, export, bench, compare, convert.

Every subcommand turns a user error (bad path, model name, value, checkpoint) into one line on
stderr and exit status 2; a traceback means a bug in dsnet.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

__all__ = ["main", "UserError"]


class UserError(Exception):
    """An error caused by the user's input; the CLI prints its message and exits with 2."""


def _positive_size(values: Sequence[int]) -> list[int]:
    if len(values) != 3 or min(values) < 1:
        raise UserError(f"--input-size takes three positive integers C H W, got {list(values)}")
    return list(values)


def _create(name: str, **kwargs):
    import timm

    import dsnet

    if name not in dsnet.MODELS:
        raise UserError(f"unknown model '{name}' (dsnet models: {', '.join(sorted(dsnet.MODELS))})")
    return timm.create_model(name, **kwargs)


def cmd_profile(args: argparse.Namespace) -> int:
    """Print (or write as JSON) every static subnet's MAdds and parameters."""
    from dsnet.madds import profile

    model = _create(args.model)
    size = _positive_size(args.input_size) if args.input_size else None
    if size is not None and size[0] != model.in_chans:
        raise UserError(f"--input-size channels must be {model.in_chans} for {args.model}, got {size[0]}")
    report = profile(model, size)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{report['model']}  input {'x'.join(map(str, report['input_size']))}")
    print(f"{'subnet':>8} {'MAdds (M)':>12} {'params (M)':>12}")
    for row in report["subnets"]:
        print(f"{row['subnet']:>8} {row['madds'] / 1e6:>12.1f} {row['params'] / 1e6:>12.3f}")
    big = report["largest"]
    print(f"{'largest':>8} {big['madds'] / 1e6:>12.1f} {big['params'] / 1e6:>12.3f}")
    return 0


def _run_context(state: dict, data_root: str | None):
    """(the checkpoint's config with ``--data`` applied, a runtime for it)."""
    from dsnet.config import config_from_dict, replace
    from dsnet.engine import setup_runtime

    cfg = config_from_dict(state["config"])
    if data_root is not None:
        cfg = replace(cfg, **{"data.root": data_root})
    return cfg, setup_runtime(cfg.train.device, cfg.train.seed, False)


def _load_run(path: str, data_root: str | None, use_ema: bool = False, stages=("supernet", "gate")):
    """(checkpoint state, model in eval mode, config with ``--data`` applied, runtime)."""
    from dsnet.checkpoint import build_model, read_checkpoint

    state = read_checkpoint(path, stages)
    cfg, runtime = _run_context(state, data_root)
    return state, build_model(state, use_ema).to(runtime.device).eval(), cfg, runtime


def parse_madds(text: str) -> float:
    """``12M``, ``1.5G``, ``800k`` or a plain number -> MAdds; UserError naming the value otherwise."""
    units = {"k": 1e3, "m": 1e6, "g": 1e9}
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) * units[raw[-1].lower()] if raw and raw[-1].lower() in units else float(raw)
    except ValueError:
        value = float("nan")
    if not value > 0:
        raise UserError(f"--target-madds takes a positive number of MAdds such as 12M, 1.5G or 800k, got {text!r}")
    return value


def _target_policy(model, loader, cfg, runtime, size, autocast, target: float, kind: str, max_batches=None) -> dict:
    """The deployment record of the ``kind`` policy whose mean MAdds on ``loader`` is ``target``."""
    from dsnet.evaluate import _batches, sharded
    from dsnet.policy import collect_outcomes, gather_outcomes, select_policy

    outcomes = collect_outcomes(model, _batches(loader, runtime.device, max_batches), runtime.device, size, autocast)
    if sharded(loader):
        outcomes = gather_outcomes(outcomes)
    try:
        return select_policy(outcomes, kind, target, cfg.gate.fallback_z, images="validation",
                             measure=cfg.gate.cascade_measure)
    except ValueError as err:
        raise UserError(str(err)) from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    """Static subnets, largest route and (after stage two) the dynamic model on validation data."""
    from dsnet.checkpoint import read_checkpoint, save_checkpoint
    from dsnet.engine import autocast_factory
    from dsnet.evaluate import evaluate_gated, evaluate_static, format_report, format_sweep_row, plot_report
    from dsnet.policy import Policy
    from dsnet.runs import build_val_loader, data_signature, write_eval

    if read_checkpoint(args.checkpoint).get("stage") == "static":
        return _evaluate_baseline(args)
    state, model, cfg, runtime = _load_run(args.checkpoint, args.data, args.ema)
    if state["stage"] != "gate" and (args.sweep or args.target_madds):
        raise UserError(f"--sweep and --target-madds need a gate: {args.checkpoint} is a stage-one checkpoint "
                        "(run train_gate.py first)")
    out = None
    if args.target_madds is not None:
        target = parse_madds(args.target_madds)
        out = Path(args.output or Path(args.checkpoint).with_name(f"{Path(args.checkpoint).stem}-{args.target_madds}.pth"))
        if out.exists():
            raise UserError(f"{out} exists; choose another -o (dsnet never overwrites a checkpoint here)")
    loader, classes = build_val_loader(cfg, runtime)
    _check_classes(state, classes)
    size = (model.in_chans, cfg.data.input_size, cfg.data.input_size)
    autocast, _ = autocast_factory(cfg.train.amp, runtime.device)
    report = evaluate_static(model, loader, runtime.device, size, autocast, args.max_batches)
    report["data"], report["dynamic"] = data_signature(cfg, classes), None
    if state["stage"] == "gate":
        record = state.get("deploy")
        if out is not None:
            record = _target_policy(model, loader, cfg, runtime, size, autocast, target, args.deploy, args.max_batches)
            model.set_policy(Policy.from_dict(record["policy"]))
        report.update(evaluate_gated(model, loader, runtime.device, size, cfg.gate.rule, autocast,
                                     args.max_batches, args.sweep or 9, cfg.gate.cascade_measure))
        if record:
            report["selection"] = record
    if not runtime.is_main:  # under torchrun every rank holds the whole set's figures
        return 0
    print(format_report(report))
    for row in report.get("sweep", []) + report.get("cascade", []):
        print(format_sweep_row(report, row))
    if out is not None:
        save_checkpoint({**{k: v for k, v in state.items() if k not in ("format", "version")}, "deploy": record}, out)
        print(f"checkpoint with this operating point -> {out}")
    if args.json:
        write_eval(Path(args.json), report)
    if args.plot:
        plot_report(report, args.plot, title=f"{state['model_name']} ({Path(args.checkpoint).name})")
    return 0


def _check_classes(state: dict, classes: list[str]) -> None:
    if state.get("classes") is not None and list(state["classes"]) != classes:
        raise UserError(f"the evaluation data has {len(classes)} classes, the checkpoint was trained on "
                        f"{len(state['classes'])}; pass --data with the dataset it was trained on")


def _evaluate_baseline(args: argparse.Namespace) -> int:
    """``dsnet evaluate`` of a static baseline (``train_supernet.py --static-subnet``) checkpoint."""
    from dsnet.baselines import baseline_report, load_static
    from dsnet.checkpoint import read_checkpoint
    from dsnet.engine import autocast_factory
    from dsnet.evaluate import evaluate_plain, format_report
    from dsnet.runs import build_val_loader, data_signature, write_eval

    if args.sweep or args.plot or args.ema:
        raise UserError(f"{args.checkpoint} is a static baseline: --sweep, --plot and --ema need a supernet")
    state = read_checkpoint(args.checkpoint, "static")
    cfg, runtime = _run_context(state, args.data)
    loader, classes = build_val_loader(cfg, runtime)
    _check_classes(state, classes)
    model, supernet = load_static(state)
    cost = supernet.route_cost(supernet.routes.resolve(state["subnet"]),
                               (supernet.in_chans, cfg.data.input_size, cfg.data.input_size))
    acc = evaluate_plain(model.to(runtime.device), loader, runtime.device,
                         autocast_factory(cfg.train.amp, runtime.device)[0], args.max_batches)
    report = {**baseline_report(state["subnet"], cost, acc), "baseline": state.get("baseline"),
              "data": data_signature(cfg, classes)}
    if not runtime.is_main:
        return 0
    print(format_report(report))
    if args.json:
        write_eval(Path(args.json), report)
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    """Re-estimate every width's BN statistics (model and EMA) and write a new checkpoint."""
    from dsnet.checkpoint import save_checkpoint
    from dsnet.engine import autocast_factory
    from dsnet.recalibrate import recalibrate_bn
    from dsnet.runs import build_data

    out = Path(args.output or Path(args.checkpoint).with_name("recalibrated.pth"))
    if out.exists():
        raise UserError(f"{out} exists; choose another -o (dsnet never overwrites a checkpoint here)")
    state, model, cfg, runtime = _load_run(args.checkpoint, args.data, stages=("supernet",))
    data = build_data(cfg, runtime)
    autocast, _ = autocast_factory(cfg.train.amp, runtime.device)
    batches = args.batches or cfg.train.recalibrate_batches
    recalibrate_bn(model, data.calib, runtime.device, batches, autocast, cfg.train.recalibrate_momentum)
    state["model"] = model.state_dict()
    if state.get("ema") is not None:
        ema = _load_run(args.checkpoint, args.data, use_ema=True, stages=("supernet",))[1]
        recalibrate_bn(ema, data.calib, runtime.device, batches, autocast, cfg.train.recalibrate_momentum)
        state["ema"] = ema.state_dict()
    state["bn_recalibrated"] = True
    save_checkpoint({k: v for k, v in state.items() if k not in ("format", "version")}, out)
    print(f"recalibrated {batches} batches per route -> {out}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a static subnet or the gated model of a checkpoint as TorchScript or ONNX."""
    from dsnet.export import export_command

    size = tuple(_positive_size(args.input_size)) if args.input_size else None
    policy = None
    if args.target_madds is not None:
        from dsnet.engine import autocast_factory
        from dsnet.policy import Policy
        from dsnet.runs import build_val_loader

        if not args.dynamic:
            raise UserError("--target-madds sets the dynamic model's operating point: use it with --dynamic")
        target = parse_madds(args.target_madds)
        state, model, cfg, runtime = _load_run(args.checkpoint, args.data, stages=("gate",))
        loader, _ = build_val_loader(cfg, runtime)
        record = _target_policy(model, loader, cfg, runtime, (model.in_chans, cfg.data.input_size, cfg.data.input_size),
                                autocast_factory(cfg.train.amp, runtime.device)[0], target, args.deploy)
        policy = Policy.from_dict(record["policy"])
        print(record["reason"])
    print(export_command(args.checkpoint, args.subnet, args.dynamic, args.format, args.output, size, policy))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Latency of the dynamic model against the largest route, the static subnets and the dense limit."""
    from dsnet.bench import bench_command

    bench_command(args.target, args.batch_sizes, args.json, args.repeats, args.threads)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    """Published weights (torchvision ResNet-50, the DS-Net release) -> a dsnet stage-one checkpoint."""
    from dsnet.convert import convert

    print(convert(args.source, args.output, args.source_format, args.ema, args.data))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Static subnets, dynamic model and static baselines of several runs in one table and plot."""
    from dsnet.compare import compare_command

    print(compare_command(args.runs, args.json, args.plot))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "profile": cmd_profile, "evaluate": cmd_evaluate, "recalibrate": cmd_recalibrate, "export": cmd_export,
    "bench": cmd_bench, "compare": cmd_compare, "convert": cmd_convert}


def _target_arguments(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--target-madds", metavar="MADDS", help=help_text)
    p.add_argument("--deploy", choices=("gate", "cascade"), default="gate",
                   help="with --target-madds: reach the target with the gate's cost bias (default) or the "
                        "confidence cascade's threshold")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnet", description="Dynamic Slimmable Networks toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="MAdds and parameters of every static subnet")
    p.add_argument("model", help="a dsnet model name, e.g. ds_mobilenet_v1")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="C H W (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p = sub.add_parser("evaluate", help="accuracy vs MAdds of every static subnet and the dynamic model")
    p.add_argument("checkpoint", help="a stage-one or stage-two checkpoint")
    p.add_argument("--data", metavar="ROOT", help="dataset root (default: the one the run used)")
    p.add_argument("--json", metavar="FILE", help="write eval.json-format results")
    p.add_argument("--plot", metavar="FILE", help="write an accuracy-vs-MAdds plot (needs matplotlib)")
    p.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="trace N operating points of the gate (cost bias from -3 to +3) and of the confidence "
                        "cascade (5%% to 60%% escalated); default 9")
    p.add_argument("--max-batches", type=int, default=None, help="evaluate on the first N batches only")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    _target_arguments(p, "write a checkpoint whose dynamic model runs at this mean MAdds on the validation "
                         "set (e.g. 12M)")
    p.add_argument("-o", "--output", metavar="FILE", help="with --target-madds: the new checkpoint "
                   "(default: CHECKPOINT-<target>.pth beside it); never overwritten")
    p = sub.add_parser("recalibrate", help="re-estimate BN statistics per width of a stage-one checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("-o", "--output", help="output checkpoint (default: recalibrated.pth beside the input)")
    p.add_argument("--batches", type=int, default=None, help="batches per route (default: the config's)")
    p.add_argument("--data", metavar="ROOT", help="dataset root (default: the one the run used)")
    p = sub.add_parser("export", help="a static subnet or the gated model as TorchScript or ONNX")
    p.add_argument("checkpoint", help="a stage-one or stage-two checkpoint (--dynamic wants stage two's)")
    route = p.add_mutually_exclusive_group(required=True)
    route.add_argument("--subnet", type=int, metavar="I", help="static subnet I (0 = slimmest)")
    route.add_argument("--dynamic", action="store_true",
                       help="the gated model: each sample takes the route its gate picks")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx", "safetensors"),
                   help="safetensors: weights only (--dynamic: the whole supernet's)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output file (a folder for --dynamic --format onnx); never overwritten")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N",
                   help="C H W of the example input (default: the run's data.input_size); ONNX keeps H and W")
    _target_arguments(p, "export the dynamic model at this mean MAdds on the validation set (e.g. 12M)")
    p.add_argument("--data", metavar="ROOT", help="with --target-madds: dataset root (default: the run's)")
    p = sub.add_parser("bench", help="latency: dynamic model vs largest route, static subnets and the dense limit")
    p.add_argument("target", metavar="CHECKPOINT",
                   help="a checkpoint (its gate, validation images) or a dsnet model name (random init, hand-set gate)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="B")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--repeats", type=int, default=10, help="interleaved timed rounds per path (medians)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p = sub.add_parser("compare", help="supernet, dynamic model and static baselines in one accuracy-vs-MAdds table")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR",
                   help="run directories (searched for eval.json) or eval.json files")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--plot", metavar="FILE", help="write an accuracy-vs-MAdds plot (needs matplotlib)")
    p = sub.add_parser("convert", help="published weights (torchvision ResNet-50, the DS-Net release) -> a dsnet checkpoint")
    p.add_argument("source", metavar="SRC", help="the checkpoint file to convert")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint; never overwritten")
    p.add_argument("--from", dest="source_format", required=True, choices=("torchvision-resnet50", "ds-net-release"),
                   help="torchvision-resnet50 -> ds_resnet50, ds-net-release -> ds_mobilenet_v1")
    p.add_argument("--ema", action="store_true", help="convert the source's EMA weights (state_dict_ema)")
    p.add_argument("--data", metavar="ROOT", help="ImageNet folder recorded in the checkpoint's config "
                   "(default /data/imagenet; evaluate/recalibrate --data override it)")
    return parser


def guarded(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; a user error becomes one line on stderr and exit 2 (DSNET_DEBUG=1 re-raises)."""
    from dsnet.engine import TrainingError

    try:
        return fn()
    except (UserError, ValueError, OSError) as err:
        if os.environ.get("DSNET_DEBUG"):
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; the last checkpoint is kept", file=sys.stderr)
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``dsnet`` command; returns the exit status."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    return guarded(f"dsnet {args.command}", lambda: COMMANDS[args.command](args))


def _train_main(prog: str, description: str, stage_two: bool, argv: Sequence[str] | None) -> int:
    """Parse ``-c CONFIG [--supernet CKPT | baseline flags] [section.key=value ...]`` and run."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    if stage_two:
        parser.add_argument("--supernet", required=True, help="stage-one checkpoint, RUN_DIR/checkpoints/last.pth")
        parser.add_argument("--target-madds", metavar="MADDS", help="ship the dynamic model at this mean MAdds "
                            "on the held-back training images (e.g. 12M; sets gate.target_madds)")
    else:
        from dsnet.baselines import BUDGETS, PRUNERS

        base = parser.add_argument_group(
            "static baselines (Liu et al. 2019; written to <output.dir>/<method>-<subnet>)")
        base.add_argument("--static-subnet", metavar="I", help="train static subnet I (or 'largest') as a "
                          "plain model instead of the supernet")
        base.add_argument("--budget", choices=BUDGETS, default="scratch-e",
                          help="scratch-e: train.epochs; scratch-b: epochs x MAdds(largest) / MAdds(I) (Liu et al.); "
                          "scratch-b-supernet: the supernet run's training MAdds (default scratch-e)")
        base.add_argument("--budget-cap-epochs", type=int, metavar="N", help="stop a scratch-b budget at N epochs "
                          "(Liu et al.'s ImageNet scripts: twice the epochs)")
        base.add_argument("--prune", choices=PRUNERS, help="prune the trained largest route to subnet I (l1, thinet, "
                          "regression) or zero its smallest weights (weight, with --static-subnet largest), then fine-tune")
        base.add_argument("--sparsity", type=float, metavar="S", help="--prune weight: the fraction of conv and linear "
                          "weights to zero (e.g. 0.5)")
        base.add_argument("--finetune-epochs", type=int, metavar="N", help="epochs of fine-tuning after pruning "
                          "(default train.epochs / 4: Liu et al. fine-tune 40 epochs after 160)")
        base.add_argument("--finetune-lr", type=float, metavar="LR", help="constant fine-tuning lr "
                          "(default train.lr / 100: Liu et al. fine-tune at 0.001 after training at 0.1)")
        base.add_argument("--pretrained", metavar="CKPT", help="the largest route's Scratch-E checkpoint to "
                          "prune (default <output.dir>/scratch-e-largest, trained first if missing)")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    args = parser.parse_intermixed_args(argv)  # overrides may sit before and after the options
    if not stage_two and args.static_subnet is None:
        given = [f for f in ("prune", "pretrained", "finetune_lr", "sparsity", "budget_cap_epochs")
                 if getattr(args, f) is not None]
        if given or args.budget != "scratch-e":
            parser.error(f"--{(given or ['budget'])[0].replace('_', '-')} needs --static-subnet I")

    def run() -> int:
        from dsnet.config import load_config
        from dsnet.runs import train_gate, train_supernet

        overrides = list(args.overrides)
        if stage_two and args.target_madds is not None:
            overrides.append(f"gate.target_madds={parse_madds(args.target_madds)}")
        cfg = load_config(args.config, overrides)
        if stage_two:
            run_dir = train_gate(cfg, args.supernet)
        elif args.static_subnet is not None:
            from dsnet.baselines import parse_subnet, train_static

            run_dir = train_static(cfg, parse_subnet(args.static_subnet), args.budget, args.prune,
                                   args.finetune_epochs, args.finetune_lr, args.pretrained,
                                   sparsity=args.sparsity, cap_epochs=args.budget_cap_epochs)
        else:
            run_dir = train_supernet(cfg)
        print(f"run directory: {run_dir}")
        return 0

    return guarded(prog, run)


def train_supernet_main(argv: Sequence[str] | None = None) -> int:
    """``train_supernet.py -c CONFIG [section.key=value ...]``: stage one."""
    return _train_main("train_supernet.py", "Stage one: train a DS-Net supernet with IEB", False, argv)


def train_gate_main(argv: Sequence[str] | None = None) -> int:
    """``train_gate.py -c CONFIG --supernet CKPT [section.key=value ...]``: stage two."""
    return _train_main("train_gate.py", "Stage two: train DS-Net gates with SGS", True, argv)


if __name__ == "__main__":
    sys.exit(main())
