"""The ``dsnet`` command line, parsed before anything heavy is imported.

``dsnet --help``, ``dsnet COMMAND --help`` and a usage error answer from argparse alone: this
module imports neither torch, timm nor dsnet (whose package face imports them, to register the
supernets with timm). It is a top-level package because importing any ``dsnet.*`` module first
runs ``dsnet/__init__.py``. The console script ``dsnet`` (``dsnet_console:main``) parses
here, then runs the command in ``dsnet.cli``; ``python -m dsnet.cli`` and the root training
scripts parse with this same parser. A list of allowed values that belongs to a dsnet module
(budgets, pruners, ONNX exporters) is repeated here, and tests/test_cli.py holds each copy equal
to its module's.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

__all__ = ["build_parser", "parse_args", "subparsers", "train_parser", "check_train_args", "TRAINERS",
           "BUDGETS", "PRUNERS", "ONNX_EXPORTERS"]

TRAINERS = {"train-supernet": "supernet", "train-gate": "gate", "train-baseline": "baseline"}
BUDGETS = ("scratch-e", "scratch-b", "scratch-b-supernet")  # dsnet.prune.budgets.BUDGETS
PRUNERS = ("l1", "thinet", "regression", "weight", "slimming", "sss", "inherited")  # dsnet.prune.baseline_spec.PRUNERS
ONNX_EXPORTERS = ("dynamo", "torchscript")  # dsnet.deploy.onnx_export.ONNX_EXPORTERS, the first the default
SEARCH_IMAGES, SEARCH_CALIB_BATCHES = 2000, 4  # dsnet.prune.search_run.IMAGES, CALIB_BATCHES
OVERRIDES_HELP = ("config overrides applied to the checkpoint's stored config, e.g. train.batch_size=256 "
                  "data.num_workers=8 train.device=cpu train.amp=bf16 data.root=/data/imagenet")


class _Version(argparse.Action):
    """``--version``: dsnet's version (imported only when asked), then exit."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"dsnet {importlib.import_module('dsnet').__version__}")
        parser.exit()


def add_train_arguments(p: argparse.ArgumentParser, stage: str) -> None:
    """The options of a trainer (``stage``: supernet, gate or baseline)."""
    p.add_argument("-c", "--config", required=True, metavar="CONFIG", help="YAML config (see configs/)")
    if stage == "gate":
        p.add_argument("--supernet", required=True, metavar="CHECKPOINT",
                       help="stage-one checkpoint, RUN_DIR/checkpoints/last.pth")
        p.add_argument("--target-madds", metavar="MADDS", help="ship the dynamic model at this mean MAdds "
                       "on the held-back training images (e.g. 12M; sets gate.target_madds)")
    else:
        _baseline_arguments(p, required=stage == "baseline")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config (the file with the overrides applied, every key) as YAML "
                        "and exit without training; it can be fed back with -c")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="config overrides, e.g. train.epochs=3 output.dir=runs/x")
    p.set_defaults(handler="train", stage=stage)


class _DeprecatedPretrained(argparse.Action):
    """``--pretrained CKPT``: the old name of ``--prune-from``; a one-line notice, then the same."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog}: --pretrained is deprecated and will be removed in the next release; "
              "use --prune-from", file=sys.stderr)
        namespace.prune_from = values


def _baseline_arguments(p: argparse.ArgumentParser, required: bool) -> None:
    base = p.add_argument_group("static baselines (Liu et al. 2019; written to <output.dir>/<method>-<subnet>)")
    what = base.add_mutually_exclusive_group(required=required)
    what.add_argument("--static-subnet", metavar="I",
                      help="train static subnet I (or 'largest') as a plain model" +
                           ("" if required else " instead of the supernet (as dsnet train-baseline does)"))
    what.add_argument("--static-arch", metavar="FILE", help="train the architecture in FILE (a pruning run's "
                      "or dsnet search's architecture.json) from scratch, for --budget, or fine-tune it from the "
                      "supernet with --prune inherited")
    base.add_argument("--budget", choices=BUDGETS, default="scratch-e",
                      help="scratch-e: train.epochs; scratch-b: epochs x MAdds(largest) / MAdds(I) (Liu et al.); "
                           "scratch-b-supernet: the supernet run's training MAdds (default scratch-e)")
    base.add_argument("--budget-cap-epochs", type=int, metavar="N", help="stop a scratch-b budget at N epochs "
                      "(Liu et al.'s ImageNet scripts: twice the epochs)")
    base.add_argument("--prune", choices=PRUNERS, help="prune the trained largest route to subnet I (l1, thinet, "
                      "regression), zero its smallest weights (weight) or find an architecture (slimming, sss; "
                      "these two with --static-subnet largest), then fine-tune; inherited: fine-tune the trained "
                      "supernet's own weights at subnet I or --static-arch")
    base.add_argument("--ratio", type=float, metavar="R", help="--prune slimming: the fraction of all channels "
                      "to remove by one global threshold on the BN scales (e.g. 0.4)")
    base.add_argument("--slimming-sparsity", type=float, metavar="S", help="--prune slimming: the L1 penalty on "
                      "BN scales of the largest route's training (default 1e-4, the paper's)")
    base.add_argument("--sss-gamma", type=float, metavar="G", help="--prune sss: the sparsity of the residual "
                      "branch factors' APG updates (default 1e-2; larger removes more blocks)")
    base.add_argument("--sparsity", type=float, metavar="S", help="the fraction of the largest route's conv and "
                      "linear weights to zero (e.g. 0.5): with --prune weight, pruned and fine-tuned; with "
                      "--budget alone, the same zeros trained from scratch")
    base.add_argument("--finetune-epochs", type=int, metavar="N", help="epochs of fine-tuning after pruning "
                      "(default train.epochs / 4: Liu et al. fine-tune 40 epochs after 160)")
    base.add_argument("--finetune-lr", type=float, metavar="LR", help="constant fine-tuning lr "
                      "(default train.lr / 100: Liu et al. fine-tune at 0.001 after training at 0.1)")
    base.add_argument("--prune-from", metavar="CHECKPOINT", help="the largest route's Scratch-E checkpoint "
                      "to prune (default <output.dir>/scratch-e-largest, trained first if missing); for --prune "
                      "inherited the supernet's (default <output.dir>/checkpoints/last.pth)")
    base.add_argument("--pretrained", metavar="CHECKPOINT", dest="prune_from", action=_DeprecatedPretrained,
                      help="deprecated name of --prune-from, removed in the next release")


def check_train_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Baseline options without ``--static-subnet`` are a usage error."""
    if args.stage != "gate" and args.static_subnet is None and args.static_arch is None:
        given = [f for f in ("prune", "prune_from", "finetune_epochs", "finetune_lr", "sparsity", "budget_cap_epochs",
                             "ratio", "slimming_sparsity", "sss_gamma") if getattr(args, f) is not None]
        if given or args.budget != "scratch-e":
            parser.error(f"--{(given or ['budget'])[0].replace('_', '-')} needs --static-subnet I"
                         + (" or --static-arch FILE" if args.prune == "inherited" else ""))


def _target_arguments(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument("--target-madds", metavar="MADDS", help=help_text)
    p.add_argument("--deploy", choices=("gate", "cascade"), default="gate",
                   help="with --target-madds: reach the target with the gate's cost bias (default) or the "
                        "confidence cascade's threshold")


def _data_argument(p: argparse.ArgumentParser, help_text: str = "dataset root (default: the one the run used)") -> None:
    p.add_argument("--data", metavar="ROOT", help=help_text)


def _checkpoint_arguments(p: argparse.ArgumentParser, dest: str, help_text: str) -> None:
    """A checkpoint and the overrides of the config stored in it."""
    p.add_argument(dest, metavar="CHECKPOINT", help=help_text)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help=OVERRIDES_HELP)


def _add_profile(sub) -> None:
    p = _command(sub, "profile", "MAdds and parameters of every static subnet, or of one baseline model",
                 "Print every static subnet's and the largest route's MAdds and parameters (no weights needed), "
                 "or those of the plain model of a baseline checkpoint or an architecture file, checked against "
                 "torch's FlopCounterMode and the module's parameter count.")
    p.add_argument("model", metavar="MODEL", help="a dsnet model name (e.g. ds_mobilenet_v1), a static baseline "
                   "checkpoint or an architecture JSON file")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"), help="input size (default: the model's)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _add_evaluate(sub) -> None:
    p = _command(sub, "evaluate", "accuracy vs MAdds of every static subnet and the dynamic model",
                 "Evaluate a checkpoint on its run's validation data: every static subnet, the largest route "
                 "and, after stage two, the dynamic model and its operating-point sweeps.")
    _checkpoint_arguments(p, "checkpoint", "a stage-one, stage-two or baseline checkpoint")
    _data_argument(p)
    p.add_argument("--json", metavar="FILE", help="write eval.json-format results")
    p.add_argument("--plot", metavar="FILE", help="write an accuracy-vs-MAdds plot (needs matplotlib)")
    p.add_argument("--sweep", type=int, default=0, metavar="N",
                   help="trace N operating points of the gate (cost bias from -3 to +3) and of the confidence "
                        "cascade (5%% to 60%% escalated); default 9")
    p.add_argument("--max-batches", type=int, default=None, metavar="N", help="evaluate on the first N batches only")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    _target_arguments(p, "write a checkpoint whose dynamic model runs at this mean MAdds on the validation "
                         "set (e.g. 12M)")
    p.add_argument("-o", "--output", metavar="FILE", help="with --target-madds: the new checkpoint "
                   "(default: CHECKPOINT-<target>.pth beside it); never overwritten")


def _add_recalibrate(sub) -> None:
    p = _command(sub, "recalibrate", "re-estimate BN statistics per width of a stage-one checkpoint",
                 "Re-estimate every width's batch-norm statistics (model and EMA) of a stage-one checkpoint on "
                 "its training data and write them as a new checkpoint.")
    _checkpoint_arguments(p, "checkpoint", "a stage-one checkpoint")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="output checkpoint (default: recalibrated.pth beside the input); never overwritten")
    p.add_argument("--batches", type=int, default=None, metavar="N", help="batches per route (default: the config's)")
    _data_argument(p)


def _add_export(sub) -> None:
    p = _command(sub, "export", "a static subnet or the gated model as TorchScript, ONNX or safetensors",
                 "Export a static subnet or the gated model of a checkpoint, or a baseline checkpoint's model, as a "
                 "file that runs without dsnet; the written file is run once and checked against dsnet's outputs.")
    p.add_argument("checkpoint", metavar="CHECKPOINT",
                   help="a stage-one or stage-two checkpoint (--dynamic wants stage two's), or a baseline "
                        "checkpoint (dsnet train-baseline; no --subnet or --dynamic)")
    route = p.add_mutually_exclusive_group()
    route.add_argument("--subnet", type=int, metavar="I", help="static subnet I (0 = slimmest)")
    route.add_argument("--dynamic", action="store_true",
                       help="the gated model: each sample takes the route its gate picks")
    p.add_argument("--format", required=True, choices=("torchscript", "onnx", "safetensors"),
                   help="safetensors: weights only (--dynamic: the whole supernet's)")
    p.add_argument("-o", "--output", required=True, metavar="FILE",
                   help="output file (a folder for --dynamic --format onnx); never overwritten")
    p.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"),
                   help="the example input (default: the run's data.input_size); ONNX keeps H and W")
    p.add_argument("--onnx-exporter", choices=ONNX_EXPORTERS, default=ONNX_EXPORTERS[0],
                   help="with --format onnx: dynamo (torch.export-based, the default) or torchscript "
                        "(the older exporter, faster to run)")
    _target_arguments(p, "export the dynamic model at this mean MAdds on the validation set (e.g. 12M)")
    _data_argument(p, "with --target-madds: dataset root (default: the run's)")


def _add_bench(sub) -> None:
    p = _command(sub, "bench", "latency: dynamic model vs largest route, static subnets and the dense limit",
                 "Time the dynamic model against the largest route, every static subnet (on the supernet and "
                 "extracted dense) and the dense limit, per batch size.")
    _checkpoint_arguments(p, "target", "a checkpoint (its gate, validation images), a baseline checkpoint (its "
                          "plain model against the dense largest route) or a dsnet model name (random init, "
                          "hand-set gate)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32], metavar="B", help="batch sizes (default 1 32)")
    p.add_argument("--images", type=int, default=64, metavar="N", help="the dynamic model runs over N validation "
                   "images (spread over the split) in batches of each size; its MAdds are their mean (default 64)")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--repeats", type=int, default=10, metavar="N", help="interleaved timed rounds per path (medians)")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch intra-op threads (default: torch's)")


def _add_search(sub) -> None:
    p = _command(sub, "search", "the best static architecture of a supernet at a MAdds budget",
                 "Slim a stage-one (or stage-two) supernet greedily from its largest route, one width choice of one "
                 "channel space per step, scoring each candidate on held-back training images after re-estimating "
                 "its BN statistics, down to --target-madds; writes the architecture (the --static-arch format), "
                 "the search's log and plot, and the plain model as a baseline checkpoint.")
    _checkpoint_arguments(p, "checkpoint", "a stage-one or stage-two checkpoint")
    p.add_argument("--target-madds", required=True, metavar="MADDS", help="stop at or under this cost (e.g. 10M)")
    p.add_argument("-o", "--output", metavar="FILE", help="the architecture record (FILE.json; or a folder for "
                   "architecture.json); the log, plot, checkpoint and eval.json go beside it (default "
                   "<run>/search-<target>/architecture.json); never overwritten")
    p.add_argument("--holdout", type=float, metavar="F", help="fraction of the training images held back from "
                   "calibration to score candidates (default gate.holdout, stage two's split)")
    p.add_argument("--images", type=int, default=SEARCH_IMAGES, metavar="N",
                   help=f"score on N of the held-back images (default {SEARCH_IMAGES})")
    p.add_argument("--calib-batches", type=int, default=SEARCH_CALIB_BATCHES, metavar="N",
                   help=f"training batches re-estimating each candidate's BN statistics (default {SEARCH_CALIB_BATCHES})")
    _data_argument(p)


def _add_compare(sub) -> None:
    p = _command(sub, "compare", "supernet, dynamic model and static baselines in one accuracy-vs-MAdds table",
                 "Gather the eval.json of several runs (supernet, gate, baselines) into one table and plot; "
                 "runs evaluated on other data are refused.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (searched for eval.json) or eval.json files")
    p.add_argument("--json", metavar="FILE", help="also write the table as JSON")
    p.add_argument("--plot", metavar="FILE", help="write an accuracy-vs-MAdds plot (needs matplotlib)")
    p.add_argument("--curves", metavar="FILE", help="write the learning curves of the stage-one runs: top-1 of "
                   "the slimmest and largest route at each evaluated epoch (needs matplotlib)")


def _add_convert(sub) -> None:
    p = _command(sub, "convert", "published weights (torchvision ResNet-50, the DS-Net release) -> a dsnet checkpoint",
                 "Convert published weights into a dsnet stage-one checkpoint; every tensor is mapped or "
                 "nothing is written.")
    p.add_argument("source", metavar="SRC", help="the checkpoint file to convert")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output checkpoint; never overwritten")
    p.add_argument("--from", dest="source_format", required=True, choices=("torchvision-resnet50", "ds-net-release"),
                   help="torchvision-resnet50 -> ds_resnet50, ds-net-release -> ds_mobilenet_v1")
    p.add_argument("--ema", action="store_true", help="convert the source's EMA weights (state_dict_ema)")
    _data_argument(p, "ImageNet folder recorded in the checkpoint's config (default /data/imagenet; evaluate and "
                      "recalibrate --data override it)")


TRAIN_SUMMARIES = {"supernet": "stage one: train a supernet (IEB)", "gate": "stage two: train the gate (SGS)",
                   "baseline": f"train a static baseline: from scratch ({', '.join(BUDGETS)}) or pruned and "
                               f"fine-tuned ({', '.join(PRUNERS)})"}
TRAIN_DESCRIPTIONS = {
    "supernet": "Stage one: train a DS-Net supernet with In-place Ensemble Bootstrapping (IEB).",
    "gate": "Stage two: freeze a stage-one supernet and train its gate with Sandwich Gate Sparsification (SGS).",
    "baseline": f"Train a static subnet or architecture from scratch (--budget {', '.join(BUDGETS)}) or pruned "
                f"from the largest route and fine-tuned (--prune {', '.join(PRUNERS)}; inherited: the trained "
                "supernet's own weights, fine-tuned), with the supernet config's data, optimizer and evaluation.",
}


def _command(sub, name: str, summary: str, description: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=summary, description=description)
    p.set_defaults(handler=name)  # the function of dsnet.cli that runs it (dsnet.cli.HANDLERS)
    return p


def build_parser() -> argparse.ArgumentParser:
    """The ``dsnet`` parser: one subparser per command."""
    parser = argparse.ArgumentParser(prog="dsnet", description="Dynamic Slimmable Networks: train, evaluate, "
                                     "measure and export DS-Net supernets and their gates.")
    parser.add_argument("--version", action=_Version, help="print dsnet's version and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, stage in TRAINERS.items():
        add_train_arguments(sub.add_parser(name, help=TRAIN_SUMMARIES[stage], description=TRAIN_DESCRIPTIONS[stage]),
                            stage)
    for add in (_add_evaluate, _add_recalibrate, _add_profile, _add_export, _add_bench, _add_search, _add_compare,
                _add_convert):
        add(sub)
    return parser


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Command name -> its subparser."""
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``dsnet COMMAND ...``; options and ``section.key=value`` overrides may be interleaved."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = subparsers(parser)
    at = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    if at == len(argv) or argv[at] not in commands or at > 0:
        parser.parse_args(argv[:at + 1])  # --version, --help, a missing or unknown command: argparse exits
    command = argv[at]
    sub = commands[command]
    args = sub.parse_intermixed_args(argv[at + 1:], argparse.Namespace(command=command))
    if command in TRAINERS:
        check_train_args(sub, args)
    return args


def train_parser(prog: str, stage: str) -> argparse.ArgumentParser:
    """The parser of a root training script (``train_supernet.py``, ``train_gate.py``)."""
    parser = argparse.ArgumentParser(prog=prog, description=TRAIN_DESCRIPTIONS[stage])
    add_train_arguments(parser, stage)
    return parser
