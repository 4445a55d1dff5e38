"""The ``dsnet`` command as a whole: trainers as subcommands, --print-config, --version, help
texts, config overrides on the commands that read a checkpoint, and the one user-error class."""
from __future__ import annotations

import argparse
import configparser
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import dsnet
from dsnet import cli
from dsnet.prune import search_run
from dsnet.train.checkpoint import CheckpointError
from dsnet.cli import main, train_gate_main, train_supernet_main
from dsnet.config import ConfigError, config_to_dict, load_config
from dsnet.train.convert import ConvertError
from dsnet.data import DataError
from dsnet.errors import UserError
from dsnet.train.checkpoint import read_checkpoint
from tests.test_runs import TINY, assert_same_weights

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yml")


def one_error_line(capsys, prog: str) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"{prog}: error: ")
    return lines[0]


# ---- parser shape -------------------------------------------------------------------------------

def all_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return {"dsnet": parser, **{f"dsnet {k}": v for k, v in cli.subparsers(parser).items()},
            "train_supernet.py": cli.train_parser("train_supernet.py", "supernet"),
            "train_gate.py": cli.train_parser("train_gate.py", "gate")}


def test_every_command_has_a_description_and_every_argument_help():
    parsers = all_parsers()
    assert {"dsnet train-supernet", "dsnet train-gate", "dsnet train-baseline", "dsnet evaluate",
            "dsnet recalibrate", "dsnet profile", "dsnet export", "dsnet bench"} <= set(parsers)
    for name, parser in parsers.items():
        assert parser.description, f"{name} has no description"
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    assert choice.help, f"{name} {choice.dest} has no summary"
            else:
                assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"


def test_input_size_is_three_numbers_wherever_it_appears():
    found = 0
    for name, parser in all_parsers().items():
        for action in parser._actions:
            if "--input-size" in action.option_strings:
                found += 1
                assert action.nargs == 3 and action.metavar == ("C", "H", "W"), name
    assert found == 2  # profile, export


def test_version_is_the_package_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"dsnet {dsnet.__version__}"
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    assert setup["metadata"]["version"] == "attr: dsnet.__version__"  # one place for the version
    assert setup["options.entry_points"]["console_scripts"].strip() == "dsnet = dsnet_console:main"  # parses first


# ---- trainers -----------------------------------------------------------------------------------

TRAIN_CALLS = {
    "dsnet train-supernet": lambda args: main(["train-supernet", *args]),
    "dsnet train-gate": lambda args: main(["train-gate", "--supernet", "nowhere.pth", *args]),
    "dsnet train-baseline": lambda args: main(["train-baseline", "--static-subnet", "0", *args]),
    "train_supernet.py": train_supernet_main,
    "train_gate.py": lambda args: train_gate_main(["--supernet", "nowhere.pth", *args]),
}


@pytest.mark.parametrize("trainer", list(TRAIN_CALLS))
def test_print_config_prints_every_key_after_overrides_and_feeds_back(tmp_path, capsys, monkeypatch, trainer):
    monkeypatch.chdir(tmp_path)
    overrides = ["train.epochs=3", "gate.routing_space=[0, 2]", f"output.dir={tmp_path / 'run'}"]
    assert TRAIN_CALLS[trainer](["-c", QUICKSTART, overrides[0], "--print-config", *overrides[1:]]) == 0
    text = capsys.readouterr().out
    assert os.listdir(tmp_path) == []  # nothing written: no run directory, no config file
    expected = load_config(QUICKSTART, overrides)
    assert yaml.safe_load(text) == config_to_dict(expected)  # every section and key, with its value
    (tmp_path / "printed.yml").write_text(text)
    assert load_config(tmp_path / "printed.yml") == expected
    assert expected.train.epochs == 3 and expected.gate.routing_space == (0, 2)


def test_print_config_fed_back_as_the_config_reproduces_the_run(tmp_path, capsys):
    """Run A: the quickstart config plus overrides. Run B: only the YAML that --print-config gave
    for A (output.dir aside). Deterministic runs of one config end on the same weights."""
    overrides = [*TINY, "train.epochs=1", "train.max_steps_per_epoch=3", "train.lr=0.05", "ieb.teacher=ensemble",
                 "ieb.ema_decay=0.5"]  # an EMA teacher, so the EMA is compared too
    assert main(["train-supernet", "-c", QUICKSTART, *overrides, "--print-config"]) == 0
    printed = tmp_path / "printed.yml"
    printed.write_text(capsys.readouterr().out)
    assert main(["train-supernet", "-c", QUICKSTART, *overrides, f"output.dir={tmp_path / 'a'}"]) == 0
    assert main(["train-supernet", "-c", str(printed), f"output.dir={tmp_path / 'b'}"]) == 0
    a, b = (read_checkpoint(tmp_path / run / "checkpoints" / "last.pth") for run in "ab")
    assert a["ema"] is not None and a["step"] == 3
    assert_same_weights(a["model"], b["model"])
    assert_same_weights(a["ema"], b["ema"])


def test_print_config_of_train_gate_holds_the_target_madds(capsys):
    assert main(["train-gate", "-c", QUICKSTART, "--supernet", "x.pth", "--target-madds", "12M", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["gate"]["target_madds"] == 12e6


def test_print_config_refuses_a_bad_key_in_one_line(capsys):
    assert main(["train-supernet", "-c", QUICKSTART, "train.epoch=3", "--print-config"]) == 2
    line = one_error_line(capsys, "dsnet train-supernet")
    assert "unknown key 'train.epoch' (did you mean 'train.epochs'?" in line


def test_the_trainers_run_as_a_module_entry_point(tmp_path):
    """``python -m dsnet.cli`` (and so ``torchrun -m dsnet.cli``) reaches the subcommands."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "dsnet.cli", "train-supernet", "-c", QUICKSTART, "--print-config",
                           "train.epochs=2"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert yaml.safe_load(done.stdout)["train"]["epochs"] == 2 and os.listdir(tmp_path) == []


def test_train_baseline_needs_a_subnet_and_baseline_flags_need_one_on_train_supernet(capsys):
    with pytest.raises(SystemExit):
        main(["train-baseline", "-c", QUICKSTART])
    assert "--static-subnet" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-supernet", "-c", QUICKSTART, "--prune-from", "x.pth"])
    assert "--prune-from needs --static-subnet I" in capsys.readouterr().err


def test_pretrained_is_a_deprecated_alias_of_prune_from(capsys):
    args = cli.parse_args(["train-baseline", "-c", "c.yml", "--static-subnet", "0", "--prune", "l1",
                           "--pretrained", "big.pth"])
    assert args.prune_from == "big.pth"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dsnet train-baseline: --pretrained is deprecated and will be removed in the next release; "
                   "use --prune-from"]
    args = cli.parse_args(["train-baseline", "-c", "c.yml", "--static-subnet", "0", "--prune", "l1",
                           "--prune-from", "big.pth"])
    assert args.prune_from == "big.pth" and capsys.readouterr().err == ""


# ---- commands that read a checkpoint take config overrides --------------------------------------

@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train-supernet", "-c", QUICKSTART, *TINY, "train.epochs=1", "train.recalibrate_bn=false",
                 f"output.dir={run}"]) == 0
    return run / "checkpoints" / "last.pth"


def test_evaluate_applies_overrides_to_the_checkpoints_config(checkpoint, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", str(checkpoint), "--max-batches", "1", "data.val_batch_size=5", "--json", str(out),
                 "train.device=cpu", "train.amp=none"]) == 0
    assert json.loads(out.read_text())["num_samples"] == 5  # one batch of the overridden size


@pytest.mark.parametrize("command", [["evaluate"], ["recalibrate", "-o", "RECAL"], ["bench", "--repeats", "1"]])
def test_a_bad_override_is_the_configs_one_line_refusal(checkpoint, tmp_path, capsys, command):
    argv = [command[0], str(checkpoint), *[str(tmp_path / "r.pth") if a == "RECAL" else a for a in command[1:]]]
    assert main([*argv, "train.batch_sizes=8"]) == 2
    line = one_error_line(capsys, f"dsnet {command[0]}")
    assert "unknown key 'train.batch_sizes' (did you mean 'train.batch_size'?" in line
    assert not (tmp_path / "r.pth").exists()


def test_recalibrate_reads_the_overridden_data(checkpoint, tmp_path, capsys):
    out = tmp_path / "r.pth"
    assert main(["recalibrate", str(checkpoint), "-o", str(out), "data.name=folder",
                 f"data.root={tmp_path / 'nodata'}"]) == 2
    assert str(tmp_path / "nodata") in one_error_line(capsys, "dsnet recalibrate")
    assert not out.exists()
    assert main(["recalibrate", str(checkpoint), "-o", str(out), "--batches", "1", "train.batch_size=8"]) == 0
    assert out.is_file()


def test_bench_of_a_model_name_refuses_overrides(capsys):
    assert main(["bench", "ds_resnet20", "train.device=cpu"]) == 2
    assert "apply to a checkpoint's config; ds_resnet20 is a model name" in one_error_line(capsys, "dsnet bench")


# ---- one user-error class -------------------------------------------------------------------------

def test_user_errors_share_one_base_class():
    for cls in (ConfigError, DataError, CheckpointError, ConvertError):
        assert issubclass(cls, UserError)
    assert cli.UserError is UserError


def test_a_user_error_is_one_line_and_any_other_exception_keeps_its_traceback(monkeypatch, capsys):
    monkeypatch.setattr(cli, "profile_command", lambda *a: (_ for _ in ()).throw(DataError("no images")))
    assert main(["profile", "ds_resnet20"]) == 2
    assert one_error_line(capsys, "dsnet profile") == "dsnet profile: error: no images"
    monkeypatch.setattr(cli, "profile_command", lambda *a: (_ for _ in ()).throw(ValueError("a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["profile", "ds_resnet20"])


@pytest.mark.parametrize("argv,message", [
    (["profile", "ds_resnet20", "--input-size", "3", "32"], "argument --input-size: expected 3 arguments"),
    (["profile", "ds_resnet20", "--input-size", "3", "32", "32", "32"], "unrecognized arguments: 32"),
    (["export", "x.pth", "--subnet", "0", "--format", "onnx", "-o", "x.onnx", "--input-size", "3", "32"],
     "argument --input-size: expected 3 arguments"),
])
def test_input_size_takes_exactly_three_numbers(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


# ---- every command that runs a model picks its device the same way ------------------------------

class _Reached(Exception):
    """Raised by the mocked ``torch.cuda.set_device``: the command got as far as choosing its GPU."""


@pytest.fixture(scope="module")
def gate_checkpoint(checkpoint, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("cli") / "gate"
    assert main(["train-gate", "-c", QUICKSTART, *TINY, "--supernet", str(checkpoint), "gate.holdout=0",
                 f"output.dir={run}"]) == 0
    return run / "checkpoints" / "last.pth"


@pytest.mark.parametrize("command", ["train-supernet", "train-gate", "train-baseline", "evaluate", "recalibrate",
                                     "bench", "export --target-madds"])
def test_each_command_gives_the_gpu_it_runs_on_an_index_in_one_process(command, checkpoint, gate_checkpoint,
                                                                       tmp_path, monkeypatch):
    """With CUDA available (mocked) and no torchrun, ``train.device=auto`` is ``cuda:0`` for every
    command that runs a model: ``torch.cuda.set_device`` refuses a device without an index."""
    given = []

    def set_device(dev):
        given.append(torch.device(dev))
        raise _Reached

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    train = ["-c", QUICKSTART, *TINY, f"output.dir={tmp_path / 'run'}"]
    argv = {"train-supernet": ["train-supernet", *train],
            "train-gate": ["train-gate", *train, "--supernet", str(checkpoint)],
            "train-baseline": ["train-baseline", *train, "--static-subnet", "0", "--budget", "scratch-e"],
            "evaluate": ["evaluate", str(checkpoint)],
            "recalibrate": ["recalibrate", str(checkpoint), "-o", str(tmp_path / "r.pth")],
            "bench": ["bench", str(checkpoint), "--repeats", "1"],
            "export --target-madds": ["export", str(gate_checkpoint), "--dynamic", "--target-madds", "1M",
                                      "--format", "torchscript", "-o", str(tmp_path / "x.pt")]}[command]
    with pytest.raises(_Reached):
        main(argv)
    assert given == [torch.device("cuda", 0)] and given[0].index == 0
    assert not (tmp_path / "run").exists() and not (tmp_path / "r.pth").exists()


def test_export_of_a_subnet_runs_on_the_cpu_whatever_gpus_there_are(checkpoint, tmp_path, monkeypatch):
    """An exported file is written and checked on the CPU (no device to choose): CUDA available
    changes nothing."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda dev: pytest.fail(f"export chose a GPU: {dev}"))
    out = tmp_path / "s0.pt"
    assert main(["export", str(checkpoint), "--subnet", "0", "--format", "torchscript", "-o", str(out)]) == 0
    assert out.is_file()


@pytest.mark.parametrize("rank, level", [(None, "INFO"), ("0", "INFO"), ("1", "WARNING"), ("7", "WARNING")])
def test_under_torchrun_only_rank_0_logs_progress(monkeypatch, rank, level):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])
    monkeypatch.setattr(logging.getLogger(), "level", logging.getLogger().level)
    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    cli.setup_logging()
    assert logging.getLevelName(logging.getLogger().level) == level


def test_a_command_leaves_its_process_group_at_the_end_even_on_an_error(monkeypatch):
    left = []
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "destroy_process_group", lambda: left.append(1))
    assert cli.guarded("dsnet x", lambda: 0) == 0
    assert cli.guarded("dsnet x", lambda: (_ for _ in ()).throw(UserError("bad"))) == 2
    assert left == [1, 1]


# ---- the console script's parser: help without torch (issue 28) --------------------------------

@pytest.mark.parametrize("argv", [["--help"], ["evaluate", "--help"], ["train-baseline", "--help"], ["bench", "-h"]])
def test_help_imports_neither_torch_timm_nor_dsnet(argv):
    code = ("import sys, dsnet_console\n"
            f"try:\n    dsnet_console.main({argv!r})\nexcept SystemExit as done:\n    status = done.code\n"
            "print(status, sorted(m for m in ('torch', 'timm', 'dsnet', 'numpy') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    assert "usage: dsnet" in done.stdout


def test_the_parsers_lists_of_allowed_values_are_the_modules_lists():
    import dsnet_command
    from dsnet.deploy.onnx_export import ONNX_EXPORTERS
    from dsnet.prune.baseline_spec import PRUNERS
    from dsnet.prune.budgets import BUDGETS

    assert (dsnet_command.BUDGETS, dsnet_command.PRUNERS, dsnet_command.ONNX_EXPORTERS) == (BUDGETS, PRUNERS, ONNX_EXPORTERS)
    assert (dsnet_command.SEARCH_IMAGES, dsnet_command.SEARCH_CALIB_BATCHES) == (search_run.IMAGES,
                                                                             search_run.CALIB_BATCHES)


def test_the_console_script_runs_the_command_after_parsing(capsys):
    import dsnet_console as console

    assert console.main(["profile", "ds_resnet20", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["model"] == "ds_resnet20"
    assert console.main(["export", "nope.pth", "--subnet", "0", "--format", "onnx", "-o", "x.onnx"]) == 2
    assert "checkpoint nope.pth does not exist" in one_error_line(capsys, "dsnet export")


def test_train_baselines_summary_and_description_name_every_method():
    from dsnet.prune.baseline_spec import METHODS

    parser = cli.build_parser()
    summary = next(a.help for a in parser._subparsers._group_actions[0]._choices_actions if a.dest == "train-baseline")
    description = cli.subparsers(parser)["train-baseline"].description
    for method in METHODS:
        assert method in summary and method in description, method
