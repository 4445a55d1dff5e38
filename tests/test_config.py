"""Strict config: defaults round-trip, overrides parse by type, every bad input names its key."""
from __future__ import annotations

import configparser
import dataclasses
import json
import logging
from pathlib import Path

import pytest

from dsnet.config import (Config, ConfigError, GateConfig, TrainConfig, config_from_dict,
                          config_to_dict, load_config, replace, save_config)
from dsnet.packaged import packaged_names


def _write(tmp_path, text: str) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_defaults_round_trip_through_dict_json_and_yaml(tmp_path):
    cfg = Config()
    assert load_config(None) == cfg
    d = config_to_dict(cfg)
    assert json.loads(json.dumps(d)) == d
    assert config_from_dict(d) == cfg
    assert config_to_dict(config_from_dict(d)) == d
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(str(tmp_path / "run" / "config.yaml")) == cfg


def test_non_default_round_trip(tmp_path):
    cfg = load_config(None, ["gate.routing_space=[0, 1, 3]", "gate.logit_bias=[1, -0.5, 0]",
                             "model.kwargs={drop_path_rate: 0.1, stem: [8, 16]}", "train.lr=1e-3",
                             "data.name=cifar10", "data.root=/data/cifar"])
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(str(tmp_path / "config.yaml"))
    assert back == cfg
    assert config_to_dict(back) == config_to_dict(cfg)
    assert back.gate.logit_bias == (1.0, -0.5, 0.0)


def test_yaml_file_and_overrides(tmp_path):
    path = _write(tmp_path, "train:\n  epochs: 5\n  warmup_lr: 1e-6\n  resume: last.pth\n"
                            "data:\n  name: folder\n  root: /data\nieb:\n")
    cfg = load_config(path, ["train.epochs=3", "train.resume=null", "train.nesterov=false",
                             "train.clip_grad=5", "gate.routing_space=[0,1,2]", "output.dir=2024",
                             "train.device=cuda:1", "data.auto_augment=rand-m9-mstd0.5"])
    assert cfg.train.epochs == 3 and cfg.train.resume is None and cfg.train.nesterov is False
    assert cfg.train.warmup_lr == 1e-6                      # YAML 1.2 float, not the string '1e-6'
    assert cfg.train.clip_grad == 5.0 and isinstance(cfg.train.clip_grad, float)
    assert cfg.gate.routing_space == (0, 1, 2)              # list -> tuple
    assert cfg.output.dir == "2024"                         # string fields keep the text as written
    assert cfg.train.device == "cuda:1"
    assert cfg.data.name == "folder" and cfg.data.root == "/data"
    assert cfg.ieb == Config().ieb                          # an empty section takes the defaults


def test_frozen_and_replace():
    cfg = Config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train.epochs = 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.train = TrainConfig()
    new = replace(cfg, **{"train.epochs": 3, "gate.routing_space": [0, 2]})
    assert new.train.epochs == 3 and new.gate.routing_space == (0, 2) and cfg.train.epochs == 10
    with pytest.raises(ConfigError, match=r"train\.batch_size"):
        replace(cfg, **{"train.batch_size": 0})
    with pytest.raises(ConfigError, match=r"unknown key 'train\.epoch'"):
        replace(cfg, **{"train.epoch": 3})


def test_sections_validate_on_construction():
    with pytest.raises(ConfigError, match=r"^train\.batch_size must be a positive integer, got 0$"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match=r"gate\.warmup_epochs"):
        Config(gate=GateConfig(epochs=2, warmup_epochs=2))
    assert TrainConfig(lr=1).lr == 1.0 and isinstance(TrainConfig(lr=1).lr, float)


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", r"^unknown key 'train\.epoch' \(did you mean 'train\.epochs'\? accepted: amp, "
                      r"batch_size, .*epochs.*\)$"),
    ("trian.epochs=3", r"^unknown section 'trian' \(did you mean 'train'\? accepted: data, gate, ieb, "
                       r"model, output, train\)$"),
    ("train.ema_decay=0.9", r"unknown key 'train\.ema_decay' \(did you mean 'ieb\.ema_decay'\?"),
    ("train.batch_size=0", r"^train\.batch_size must be a positive integer, got 0$"),
    ("train.epochs=ten", r"^train\.epochs must be an integer, got 'ten'$"),
    ("train.epochs=3.0", r"^train\.epochs must be an integer, got 3\.0$"),
    ("train.epochs=true", r"^train\.epochs must be an integer, got True$"),
    ("train.nesterov=1", r"^train\.nesterov must be true or false, got 1$"),
    ("train.lr=null", r"^train\.lr must be a finite number, got None$"),
    ("train.lr=.nan", r"^train\.lr must be a finite number, got nan$"),
    ("train.lr=0", r"^train\.lr must be positive, got 0"),
    ("train.clip_grad=[1]", r"^train\.clip_grad must be a finite number or null, got \[1\]$"),
    ("train.grad_accum=0", r"train\.grad_accum must be a positive integer"),
    ("train.label_smoothing=1", r"train\.label_smoothing must be in \[0, 1\)"),
    ("data.reprob=1.5", r"data\.reprob must be in \[0, 1\]"),
    ("ieb.ema_decay=1.0", r"ieb\.ema_decay must be in \[0, 1\)"),
    ("ieb.num_random=-1", r"ieb\.num_random must be a non-negative integer"),
    ("data.num_workers=-1", r"data\.num_workers must be a non-negative integer"),
    ("gate.epochs=0", r"gate\.epochs must be a positive integer"),
    ("train.warmup_epochs=10",
     r"^train\.warmup_epochs must be less than train\.epochs \(10\), got 10\.0$"),
    ("train.warmup_epochs=-1", r"train\.warmup_epochs must be non-negative"),
    ("data.name=imagenet",
     r"^data\.name must be one of synthetic, folder, cifar10, cifar100, got 'imagenet'$"),
    ("data.name=cifar10", r"^data\.root must be set when data\.name is 'cifar10'"),
    ("train.opt=sgdd", r"^train\.opt must be one of sgd, .*adamw.*, got 'sgdd'$"),
    ("train.sched=linear", r"train\.sched must be one of cosine, step, none"),
    ("train.amp=fp8", r"train\.amp must be one of none, bf16, fp16, auto"),
    ("ieb.teacher=student", r"ieb\.teacher must be one of ensemble, ema, inplace, none"),
    ("gate.rule=widest", r"gate\.rule must be one of slimmest, slimmest_largest, cheapest"),
    ("train.device=gpu", r"^train\.device must be auto, cpu, cuda or cuda:N, got 'gpu'$"),
    ("gate.routing_space=[]", r"gate\.routing_space must be a non-empty, strictly increasing list"),
    ("gate.routing_space=[1,1]", r"gate\.routing_space must be a non-empty, strictly increasing"),
    ("gate.routing_space=[2,1]", r"gate\.routing_space must be a non-empty, strictly increasing"),
    ("gate.routing_space=[-1,0]", r"gate\.routing_space must be a non-empty, strictly increasing"),
    ("gate.routing_space=[0,1.5]",
     r"^gate\.routing_space must be a list of integers or null, got \[0, 1\.5\]$"),
    ("gate.routing_space=[true]", r"gate\.routing_space must be a list of integers or null"),
    ("gate.routing_space=3", r"gate\.routing_space must be a list of integers or null, got 3"),
    ("model.kwargs=[1]", r"^model\.kwargs must be a mapping with string keys, got \[1\]$"),
    ("model.num_classes=0", r"model\.num_classes must be a positive integer"),
    ("output.dir=", r"^output\.dir must be a string, got None$"),
    ("train.best_metric=top5",
     r"^train\.best_metric must be one of top1_largest, top1_slimmest, top1_mean, got 'top5'$"),
])
def test_bad_values_name_their_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_logit_bias_must_match_routing_space():
    with pytest.raises(ConfigError, match=r"gate\.logit_bias must have one value per gate\.routing_space"):
        load_config(None, ["gate.routing_space=[0,1]", "gate.logit_bias=[0,0,0]"])


@pytest.mark.parametrize("override", ["train.epochs", "epochs=3", "train.=3", ".epochs=3",
                                      "train.epochs.x=3"])
def test_malformed_override(override):
    with pytest.raises(ConfigError, match=rf"^override '{override}' needs the form section\.key=value$"):
        load_config(None, [override])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match=r"is not valid YAML \(mapping values .* at line 2, column 12\)$"):
        load_config(_write(tmp_path, "train:\n  epochs: a: b\n"))
    with pytest.raises(ConfigError, match=r"must hold a mapping of sections"):
        load_config(_write(tmp_path, "- 1\n- 2\n"))
    with pytest.raises(ConfigError, match=r"^section 'train' must be a mapping of key: value, got 5$"):
        load_config(_write(tmp_path, "train: 5\n"))
    with pytest.raises(ConfigError, match=r"^unknown section 'epochs' \(did you mean 'train\.epochs'\?"):
        load_config(_write(tmp_path, "epochs: 5\n"))
    assert load_config(_write(tmp_path, "")) == Config()


def test_trainer_overrides_may_sit_before_and_after_the_options(tmp_path, capsys):
    """``train_gate.py -c C --supernet S a=b`` and ``-c C a=b --supernet S c=d`` both parse; the
    trailing override reaches the config (its bad value is what gets reported)."""
    from dsnet.cli import train_gate_main

    config = str(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yml")
    code = train_gate_main(["-c", config, f"output.dir={tmp_path}", "--supernet", str(tmp_path / "none.pth"),
                            "gate.epochs=zero"])
    err = capsys.readouterr().err
    assert code == 2 and "gate.epochs" in err and "unrecognized arguments" not in err
    assert not any(tmp_path.iterdir())


ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "configs").glob("*.yml"))
SHIPPED_NAMES = ("cifar10_ds_resnet20, cifar10_ds_resnet20_g2_12ep, cifar10_ds_resnet20_g2_6ep, "
                 "imagenet_ds_mobilenet_v1, imagenet_ds_mobilenet_v1_release, quickstart")


@pytest.mark.parametrize("spelling", ["configs/quickstart.yml", "quickstart.yml", "quickstart"])
def test_a_missing_path_that_names_a_shipped_config_reads_the_shipped_file(tmp_path, monkeypatch, caplog, spelling):
    monkeypatch.chdir(tmp_path)  # an empty directory: no configs/ here
    with caplog.at_level(logging.INFO, logger="dsnet.config"):
        cfg = load_config(spelling, ["train.epochs=2"])
    assert cfg == load_config(str(ROOT / "configs" / "quickstart.yml"), ["train.epochs=2"])
    assert cfg.model.name == "ds_resnet20" and cfg.output.dir == "runs/quickstart"
    assert [r.getMessage() for r in caplog.records] == [
        f"config file '{spelling}' is not in {tmp_path}; using the one shipped with dsnet: "
        f"{ROOT / 'configs' / 'quickstart.yml'}"]


@pytest.mark.parametrize("spelling", ["configs/quickstart.yml", "quickstart.yml", "quickstart"])
def test_a_path_that_exists_wins_over_the_shipped_config(tmp_path, monkeypatch, caplog, spelling):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / spelling).write_text("train:\n  epochs: 7\n")
    with caplog.at_level(logging.INFO, logger="dsnet.config"):
        assert load_config(spelling).train.epochs == 7
    assert load_config(str(ROOT / "configs" / "quickstart.yml")).train.epochs != 7
    assert caplog.records == []


@pytest.mark.parametrize("path", ["configs/nope.yml", "nope", "elsewhere/quickstart.yml", "{tmp}/configs/quickstart.yml"])
def test_a_missing_config_that_is_not_shipped_is_refused_naming_the_shipped_ones(tmp_path, monkeypatch, path):
    monkeypatch.chdir(tmp_path)
    path = path.format(tmp=tmp_path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"config file '{path}' does not exist and names no config shipped with dsnet "
                               f"(pass the path of a YAML file or one of: {SHIPPED_NAMES})")
    assert not any(tmp_path.iterdir())


def test_setup_cfg_installs_every_package_and_the_configs():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    options = setup["options"]
    listed = {p.strip() for p in options["packages"].split(",")}
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for top in ("dsnet", "dsnet_command")
               for p in (ROOT / top).rglob("__init__.py")}
    assert listed == on_disk | {"dsnet.configs"}
    assert options["package_dir"].split() == ["dsnet.configs", "=", "configs"]
    assert setup["options.package_data"]["dsnet.configs"].strip() == "*.yml"
    assert packaged_names() == [p.stem for p in SHIPPED] and len(SHIPPED) == 6


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_config_loads_and_builds_its_model(path):
    import timm

    import dsnet  # noqa: F401  (registers the models)

    cfg = load_config(str(path))
    model = timm.create_model(cfg.model.name, **dict(cfg.model.kwargs or {}))
    space = cfg.gate.routing_space or range(model.num_subnets)
    assert max(space) < model.num_subnets


@pytest.mark.parametrize("weights, message", [
    ((0, 0, 0), r"^gate\.sgs_weight, gate\.task_weight and gate\.complexity_weight are all 0, so nothing"),
    ((0, 0, 0.5, "gate.complexity_target=1"),
     r"^gate\.complexity_target must be below 1 when gate\.sgs_weight and gate\.task_weight are 0 .* got 1\.0$"),
])
def test_gate_weights_that_train_nothing_are_refused_by_name(weights, message):
    sgs, task, complexity, *rest = weights
    overrides = [f"gate.sgs_weight={sgs}", f"gate.task_weight={task}", f"gate.complexity_weight={complexity}", *rest]
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


@pytest.mark.parametrize("weights", [(1, 0, 0), (0, 1, 0), (0, 0, 0.5)])
def test_any_gate_term_that_trains_the_head_is_accepted(weights):
    sgs, task, complexity = weights
    cfg = load_config(None, [f"gate.sgs_weight={sgs}", f"gate.task_weight={task}",
                             f"gate.complexity_weight={complexity}"])
    assert (cfg.gate.sgs_weight, cfg.gate.task_weight, cfg.gate.complexity_weight) == weights
