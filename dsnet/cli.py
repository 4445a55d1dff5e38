"""The ``dsnet`` command: train-supernet, train-gate, train-baseline, evaluate, recalibrate,
profile, export, bench, search, compare, convert.

The parser is ``dsnet_command`` (a top-level package that imports neither torch nor dsnet, so
``dsnet --help`` answers at once); the console script ``dsnet_console`` parses there and
imports this module after. ``python -m dsnet.cli`` (torchrun's entry) and the root training
scripts enter here and parse with the same parser;
each subcommand's function here calls one function of the module that owns the work.
A user error (``dsnet.errors.UserError``: a bad path, model name, key, value, checkpoint) and an
OS error (a full disk, a folder it may not write) become one line on stderr and exit status 2; a
training failure (``TrainingError``) exit status 1; any other exception is a bug in dsnet and
keeps its traceback.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Callable, Sequence

from dsnet_command import TRAINERS, build_parser, check_train_args, parse_args, subparsers, train_parser

from dsnet.config import config_yaml, load_config
from dsnet.deploy.bench import bench_command
from dsnet.deploy.export import export_command, target_export_policy
from dsnet.errors import UserError
from dsnet.models.madds import parse_madds
from dsnet.prune.baseline_spec import parse_subnet
from dsnet.prune.baselines import train_static
from dsnet.prune.search_run import search_command
from dsnet.report.compare import compare_command
from dsnet.report.evaluate import evaluate_command
from dsnet.report.profile import profile_command
from dsnet.train.convert import convert
from dsnet.train.engine import TrainingError, close_runtime
from dsnet.train.recalibrate import recalibrate_command
from dsnet.train.stage_one import train_supernet
from dsnet.train.stage_two import train_gate

__all__ = ["main", "run", "HANDLERS", "build_parser", "parse_args", "subparsers", "train_parser", "TRAINERS",
           "train_supernet_main", "train_gate_main", "UserError"]


# ---- commands: each calls the module that owns the work ----------------------------------------

def cmd_train(args: argparse.Namespace) -> int:
    """Stage one, stage two or a static baseline from ``-c CONFIG`` plus overrides."""
    overrides = list(args.overrides)
    if getattr(args, "target_madds", None) is not None:
        overrides.append(f"gate.target_madds={parse_madds(args.target_madds)}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    if args.stage == "gate":
        run_dir = train_gate(cfg, args.supernet)
    elif args.static_subnet is not None or args.static_arch is not None:
        subnet = parse_subnet(args.static_subnet) if args.static_subnet is not None else None
        run_dir = train_static(cfg, subnet, args.budget, args.prune, args.finetune_epochs, args.finetune_lr,
                               args.prune_from, sparsity=args.sparsity, cap_epochs=args.budget_cap_epochs,
                               ratio=args.ratio, static_arch=args.static_arch,
                               slimming_sparsity=args.slimming_sparsity, sss_gamma=args.sss_gamma)
    else:
        run_dir = train_supernet(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # once under torchrun
        print(f"run directory: {run_dir}")
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    print(profile_command(args.model, args.input_size, args.json))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    evaluate_command(args.checkpoint, overrides=args.overrides, data_root=args.data, json_path=args.json,
                     plot=args.plot, sweep=args.sweep, max_batches=args.max_batches, ema=args.ema,
                     target_madds=args.target_madds, deploy=args.deploy, output=args.output)
    return 0


def cmd_recalibrate(args: argparse.Namespace) -> int:
    print(recalibrate_command(args.checkpoint, args.output, args.batches, args.data, args.overrides))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    """Write a static subnet or the gated model of a checkpoint as TorchScript, ONNX or safetensors."""
    policy = None
    if args.target_madds is not None:
        if not args.dynamic:
            raise UserError("--target-madds sets the dynamic model's operating point: use it with --dynamic")
        policy, reason = target_export_policy(args.checkpoint, args.target_madds, args.deploy, args.data)
        print(reason)
    print(export_command(args.checkpoint, args.subnet, args.dynamic, args.format, args.output, args.input_size,
                         policy, args.onnx_exporter))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    bench_command(args.target, args.batch_sizes, args.json, args.repeats, args.threads, overrides=args.overrides,
                  images=args.images)
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    print(convert(args.source, args.output, args.source_format, args.ema, args.data))
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    print(search_command(args.checkpoint, args.target_madds, args.output, args.holdout, args.images,
                         args.calib_batches, args.data, args.overrides))
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    print(compare_command(args.runs, args.json, args.plot, args.curves))
    return 0


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "train": cmd_train, "evaluate": cmd_evaluate, "recalibrate": cmd_recalibrate, "profile": cmd_profile,
    "export": cmd_export, "bench": cmd_bench, "search": cmd_search, "compare": cmd_compare,
    "convert": cmd_convert}


# ---- entry points -------------------------------------------------------------------------------

def guarded(prog: str, fn: Callable[[], int]) -> int:
    """Run ``fn``; a user or OS error becomes one line on stderr and exit 2 (DSNET_DEBUG=1
    re-raises), a training failure exit 1; other exceptions propagate with their traceback.
    Under torchrun the process leaves its process group at the end, whatever happened."""
    try:
        return fn()
    except (UserError, OSError) as err:
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
    finally:
        close_runtime()


def setup_logging() -> None:
    """Progress messages on the console: from one process (torchrun's RANK 0, or the only one);
    the other ranks print warnings and errors only, so nothing shows N times."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="%(message)s")


def run(args: argparse.Namespace) -> int:
    """Run the command ``dsnet_command.parse_args`` parsed; returns the exit status."""
    setup_logging()
    return guarded(f"dsnet {args.command}", lambda: HANDLERS[args.handler](args))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m dsnet.cli``: parse and run, as the ``dsnet`` console script does; returns the exit status."""
    return run(parse_args(argv))


def _train_script(prog: str, stage: str, argv: Sequence[str] | None) -> int:
    setup_logging()
    parser = train_parser(prog, stage)
    args = parser.parse_intermixed_args(argv)  # overrides may sit before and after the options
    check_train_args(parser, args)
    return guarded(prog, lambda: cmd_train(args))


def train_supernet_main(argv: Sequence[str] | None = None) -> int:
    """``train_supernet.py -c CONFIG [section.key=value ...]``: ``dsnet train-supernet``."""
    return _train_script("train_supernet.py", "supernet", argv)


def train_gate_main(argv: Sequence[str] | None = None) -> int:
    """``train_gate.py -c CONFIG --supernet CKPT [section.key=value ...]``: ``dsnet train-gate``."""
    return _train_script("train_gate.py", "gate", argv)


if __name__ == "__main__":
    sys.exit(main())
