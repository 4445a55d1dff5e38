"""The ``dsnet`` command: profile, evaluate, recalibrate, export, bench.

Every subcommand turns a user error (bad path, model name, value, checkpoint) into one line on
stderr and exit status 2; a traceback means a bug in dsnet.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
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


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"profile": cmd_profile}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dsnet", description="Dynamic Slimmable Networks toolkit")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("profile", help="MAdds and parameters of every static subnet")
    p.add_argument("model", help="a dsnet model name, e.g. ds_mobilenet_v1")
    p.add_argument("--input-size", type=int, nargs="+", metavar="N", help="C H W (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
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


def _train_parser(prog: str, description: str, supernet: bool) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-c", "--config", required=True, help="YAML config (see configs/)")
    if supernet:
        parser.add_argument("--supernet", required=True, help="stage-one checkpoint, RUN_DIR/checkpoints/last.pth")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides")
    return parser


def train_supernet_main(argv: Sequence[str] | None = None) -> int:
    """``train_supernet.py -c CONFIG [section.key=value ...]``: stage one."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _train_parser("train_supernet.py", "Stage one: train a DS-Net supernet with IEB", False).parse_args(argv)

    def run() -> int:
        from dsnet.config import load_config
        from dsnet.runs import train_supernet

        print(f"run directory: {train_supernet(load_config(args.config, args.overrides))}")
        return 0

    return guarded("train_supernet.py", run)


def train_gate_main(argv: Sequence[str] | None = None) -> int:
    """``train_gate.py -c CONFIG --supernet CKPT [section.key=value ...]``: stage two."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = _train_parser("train_gate.py", "Stage two: train DS-Net gates with SGS", True).parse_args(argv)

    def run() -> int:
        from dsnet.config import load_config
        from dsnet.runs import train_gate

        print(f"run directory: {train_gate(load_config(args.config, args.overrides), args.supernet)}")
        return 0

    return guarded("train_gate.py", run)


if __name__ == "__main__":
    sys.exit(main())
