"""Strict run configuration: a YAML file plus ``section.key=value`` overrides -> frozen dataclasses.

    cfg = load_config("configs/cifar10.yaml", ["train.epochs=3", "gate.routing_space=[0,1,2]"])
    cfg.train.epochs                         # 3
    cfg = replace(cfg, **{"train.lr": 0.05})  # a validated copy; configs are frozen
    save_config(cfg, "runs/x/config.yaml")   # load_config reads it back equal

Validation is table-driven: types come from the dataclass annotations, enumerations from
``_CHOICES``, ranges from ``_RULES`` and the few constraints between fields from ``_check_cross``.
Checks that need the model (does ``gate.routing_space`` fit its width list?) belong to the model
code. Every failure raises ``ConfigError`` with one sentence naming the key as ``section.key``
and what it accepts.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import logging
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Callable, Sequence

import yaml

from dsnet.errors import UserError
from dsnet.packaged import packaged_config, packaged_names

__all__ = ["ConfigError", "Config", "ModelConfig", "DataConfig", "TrainConfig", "IEBConfig",
           "GateConfig", "OutputConfig", "load_config", "config_from_dict", "config_to_dict",
           "save_config", "config_yaml", "apply_overrides", "replace", "check_root_used", "BEST_METRICS", "TEACHERS",
           "EMA_TEACHERS", "RULES", "HEADS", "DEPLOYS", "MEASURES", "COST_UNITS",
           "DATASETS", "INTERPOLATIONS", "NORMALIZE_ON"]


_log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A bad config file, override, key or value; the message is one sentence naming it."""


class _Section:
    """Validates and normalises its fields on construction (int -> float, list -> tuple)."""

    def __post_init__(self) -> None:
        section = _SECTION_NAMES[type(self)]
        for name, tp in _fields(type(self)).items():
            object.__setattr__(self, name, _check(f"{section}.{name}", getattr(self, name), tp))


@dataclass(frozen=True)
class ModelConfig(_Section):
    name: str = "ds_resnet20"                   # a dsnet model registered with timm
    num_classes: int | None = None              # None: taken from the dataset
    drop_rate: float = 0.0
    kwargs: dict = field(default_factory=dict)  # extra keyword arguments for timm.create_model


@dataclass(frozen=True)
class DataConfig(_Section):
    name: str = "synthetic"                     # synthetic, folder, cifar10, cifar100
    root: str | None = None                     # required unless synthetic; existence checked by data.py
    input_size: int = 32
    num_workers: int = 2
    synthetic_train_size: int = 10000
    synthetic_val_size: int = 2000
    synthetic_classes: int = 10
    synthetic_seed: int = 0
    auto_augment: str | None = None             # a timm auto-augment string, e.g. "rand-m9-mstd0.5"
    reprob: float = 0.0                         # random-erasing probability
    mixup: float = 0.0                          # mixup alpha, 0 = off
    cutmix: float = 0.0                         # cutmix alpha, 0 = off
    interpolation: str = "bilinear"
    crop_pct: float | None = None               # None: timm's default
    skip_bad_images: bool = False
    val_batch_size: int | None = None           # None: train.batch_size
    # where images become normalised float tensors: workers (ToTensor, Normalize, random erasing in
    # the DataLoader workers, float32 batches), device (the GPU input path: workers stop at uint8,
    # the run's device normalises and erases each batch, copied on a side stream), auto (device on CUDA)
    normalize_on: str = "auto"


@dataclass(frozen=True)
class TrainConfig(_Section):
    epochs: int = 10
    batch_size: int = 64                        # per process
    lr: float = 0.1                             # effective lr = lr * global_batch / lr_base_batch,
    lr_base_batch: int = 256                    # global_batch = batch_size * world_size * grad_accum
    opt: str = "sgd"
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    sched: str = "cosine"                       # cosine, step, none
    warmup_epochs: float = 0.0
    warmup_lr: float = 1e-5
    min_lr: float = 0.0
    label_smoothing: float = 0.1
    grad_accum: int = 1
    clip_grad: float | None = None
    amp: str = "none"                           # none, bf16, fp16, auto
    channels_last: bool = False
    device: str = "auto"                        # auto, cpu, cuda, cuda:N
    seed: int = 0
    deterministic: bool = False
    log_interval: int = 50                      # steps
    eval_interval: int = 1                      # epochs
    max_steps_per_epoch: int | None = None
    resume: str | None = None                   # a checkpoint path
    resume_changes: str = "refuse"              # a resumed run's config changes that alter training: refuse, accept
    best_metric: str = "top1_largest"           # top1_largest, top1_slimmest, top1_mean
    recalibrate_bn: bool = True
    recalibrate_batches: int = 20
    progress: bool = True
    init_from: str | None = None                # a checkpoint whose weights start a stage-one run (fresh optimizer, schedule)
    cooldown_epochs: int = 0                    # epochs at min_lr after the schedule, both stages (release: 10)
    eval_ema: bool = False                      # evaluate, report and pick best.pth by the EMA weights
    recalibrate_momentum: float | None = None   # None: BN recalibration averages its batches equally


@dataclass(frozen=True)
class IEBConfig(_Section):
    num_random: int = 2                         # random subnets per step, between largest and slimmest
    # ensemble: EMA-largest teaches all, the slimmest learns from the EMA ensemble (paper default);
    # ema: EMA-largest teaches all (the published config); inplace: the live largest teaches,
    # no EMA; none: every subnet learns from the labels.
    teacher: str = "ensemble"
    ema_decay: float = 0.997
    ema_warmup: bool = False


@dataclass(frozen=True)
class GateConfig(_Section):
    routing_space: tuple[int, ...] | None = None  # choice indices of the gated group; None = all
    rule: str = "slimmest"                      # SGS target rule: slimmest, slimmest_largest, cheapest
    balance: bool = True                        # weight SGS targets by inverse batch frequency
    sgs_weight: float = 1.0
    task_weight: float = 1.0
    # penalty = complexity_weight * max(mean cost - complexity_target, 0) ** 2, the cost of a route
    # being its MAdds as a fraction of the widest route of the routing space (the release uses
    # GMAdds, which ties the weight to the model's size; a fraction works for every model)
    complexity_weight: float = 0.5
    complexity_target: float = 0.0              # fraction of the widest routing-space route
    gumbel_tau: float = 1.0
    epochs: int = 10
    # epochs between evaluations of the gate on the validation set (each runs every route); None: the
    # last epoch only (the static subnets, frozen, are evaluated once)
    eval_interval: int | None = None
    lr: float = 0.01
    lr_base_batch: int = 256
    opt: str = "adamw"
    weight_decay: float = 0.01
    warmup_epochs: float = 0.0
    logit_bias: tuple[float, ...] | None = None  # initial gate logits, one per routing choice
    head: str = "fc"                            # width head: fc (published) or mlp (FC -> ReLU -> dropout -> FC)
    head_hidden: int = 64                       # mlp: hidden units
    head_dropout: float = 0.1                   # mlp: dropout before the last FC
    soft_targets: bool = False                  # SGS targets as probabilities from each route's p(label)
    # deployment (dsnet.train.policy_select): after training, the policy the dynamic model ships is chosen on
    # `holdout` of the training images, which the gate does not train on
    holdout: float = 0.1                        # fraction of the training set; 0: ship the gate as trained
    deploy: str = "auto"                        # auto: best of gate / cascade, else static fallback; gate; cascade
    fallback_z: float = 1.0                     # a dynamic policy ships when gain - z x standard error > 0
    target_madds: float | None = None           # ship the gate (or cascade) at this mean MAdds instead
    cascade_measure: str = "margin"             # the cascade's confidence: top-two softmax margin, or max (top probability)
    cost_unit: str = "fraction"                 # a route's cost in the complexity term: fraction, gmadds
    label_smoothing: float = 0.0                # on the SGS and task cross-entropies (release: 0.1)
    ema_decay: float | None = None              # an EMA of the gate (release: 0.997); None: no EMA


@dataclass(frozen=True)
class OutputConfig(_Section):
    dir: str = "runs/default"
    checkpoint_interval: int = 1                # epochs
    overwrite: bool = False
    tensorboard: bool = False                   # also log to TensorBoard in <dir>/tensorboard (pip install 'dsnet[tensorboard]')


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ieb: IEBConfig = field(default_factory=IEBConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

    def __post_init__(self) -> None:
        for name, cls in _SECTIONS.items():
            if not isinstance(getattr(self, name), cls):
                raise ConfigError(f"section '{name}' must be a {cls.__name__}, got {getattr(self, name)!r}")
        _check_cross(self)


_SECTIONS: dict[str, type] = {f.name: f.default_factory for f in dataclasses.fields(Config)}
_SECTION_NAMES = {cls: name for name, cls in _SECTIONS.items()}
_ACCEPTED_SECTIONS = ", ".join(sorted(_SECTIONS))

BEST_METRICS = ("top1_largest", "top1_slimmest", "top1_mean")  # checkpoint selection (runs.best_metric)
# the allowed values of the keys below, declared once: the modules that act on them import them
TEACHERS = ("ensemble", "ema", "inplace", "none")  # ieb.teacher (dsnet.train.ieb)
EMA_TEACHERS = ("ensemble", "ema")                # the teachers that keep an EMA of the supernet
RULES = ("slimmest", "slimmest_largest", "cheapest")  # gate.rule (dsnet.train.sgs)
HEADS = ("fc", "mlp")                              # gate.head (dsnet.layers.heads)
DEPLOYS = ("auto", "gate", "cascade")              # gate.deploy (dsnet.train.policy_select)
MEASURES = ("margin", "max")                       # gate.cascade_measure (dsnet.train.policy_select)
COST_UNITS = ("fraction", "gmadds")                # gate.cost_unit (dsnet.train.runs)
DATASETS = ("synthetic", "folder", "cifar10", "cifar100")  # data.name (dsnet.data)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest")        # data.interpolation (dsnet.data)
NORMALIZE_ON = ("auto", "device", "workers")               # data.normalize_on (dsnet.data)
_OPTIMIZERS = ("sgd", "momentum", "nesterov", "adam", "adamw", "nadam", "nadamw", "radam",
               "rmsprop", "rmsproptf", "lamb", "lars", "lion", "adabelief", "adamp", "sgdp")
_CHOICES: dict[str, tuple[str, ...]] = {
    "data.name": DATASETS,
    "data.interpolation": INTERPOLATIONS,
    "data.normalize_on": NORMALIZE_ON,
    "train.opt": _OPTIMIZERS,
    "train.sched": ("cosine", "step", "none"),
    "train.amp": ("none", "bf16", "fp16", "auto"),
    "train.best_metric": BEST_METRICS,
    "train.resume_changes": ("refuse", "accept"),
    "ieb.teacher": TEACHERS,
    "gate.rule": RULES,
    "gate.head": HEADS,
    "gate.deploy": DEPLOYS,
    "gate.cascade_measure": MEASURES,
    "gate.opt": _OPTIMIZERS,
    "gate.cost_unit": COST_UNITS,
}

_Rule = tuple[Callable[[Any], bool], str]  # (value is accepted, what is accepted)
_POS_INT: _Rule = (lambda v: v >= 1, "a positive integer")
_NONNEG_INT: _Rule = (lambda v: v >= 0, "a non-negative integer")
_POS: _Rule = (lambda v: v > 0, "positive")
_NONNEG: _Rule = (lambda v: v >= 0, "non-negative")
_UNIT: _Rule = (lambda v: 0 <= v < 1, "in [0, 1)")
_NONEMPTY: _Rule = (lambda v: len(v) > 0, "a non-empty string")
_RULES: dict[str, _Rule] = {
    "model.name": _NONEMPTY, "model.num_classes": _POS_INT, "model.drop_rate": _UNIT,
    "data.root": _NONEMPTY, "data.input_size": _POS_INT, "data.num_workers": _NONNEG_INT,
    "data.synthetic_train_size": _POS_INT, "data.synthetic_val_size": _POS_INT,
    "data.synthetic_classes": (lambda v: v >= 2, "an integer >= 2"),
    "data.synthetic_seed": _NONNEG_INT, "data.reprob": (lambda v: 0 <= v <= 1, "in [0, 1]"),
    "data.mixup": _NONNEG, "data.cutmix": _NONNEG, "data.auto_augment": _NONEMPTY,
    "data.crop_pct": (lambda v: 0 < v <= 1, "in (0, 1]"), "data.val_batch_size": _POS_INT,
    "train.epochs": _POS_INT, "train.batch_size": _POS_INT, "train.lr": _POS,
    "train.lr_base_batch": _POS_INT, "train.momentum": _UNIT, "train.weight_decay": _NONNEG,
    "train.warmup_epochs": _NONNEG, "train.warmup_lr": _NONNEG, "train.min_lr": _NONNEG,
    "train.label_smoothing": _UNIT, "train.grad_accum": _POS_INT, "train.clip_grad": _POS,
    "train.device": (lambda v: re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                     "auto, cpu, cuda or cuda:N"),
    "train.seed": _NONNEG_INT, "train.log_interval": _POS_INT, "train.eval_interval": _POS_INT,
    "train.max_steps_per_epoch": _POS_INT, "train.resume": _NONEMPTY,
    "train.recalibrate_batches": _POS_INT,
    "ieb.num_random": _NONNEG_INT, "ieb.ema_decay": _UNIT,
    "gate.routing_space": (lambda v: len(v) > 0 and v[0] >= 0 and all(a < b for a, b in zip(v, v[1:])),
                           "a non-empty, strictly increasing list of non-negative integers"),
    "gate.sgs_weight": _NONNEG, "gate.task_weight": _NONNEG, "gate.complexity_weight": _NONNEG,
    "gate.complexity_target": _NONNEG, "gate.gumbel_tau": _POS, "gate.epochs": _POS_INT,
    "gate.eval_interval": _POS_INT,
    "gate.lr": _POS, "gate.lr_base_batch": _POS_INT, "gate.weight_decay": _NONNEG,
    "gate.warmup_epochs": _NONNEG, "gate.logit_bias": (lambda v: len(v) > 0, "a non-empty list of numbers"),
    "gate.head_hidden": _POS_INT, "gate.head_dropout": _UNIT, "gate.holdout": (lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "gate.fallback_z": _NONNEG, "gate.target_madds": _POS,
    "output.dir": _NONEMPTY, "output.checkpoint_interval": _POS_INT,
    "train.cooldown_epochs": _NONNEG_INT, "train.recalibrate_momentum": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "gate.label_smoothing": _UNIT, "gate.ema_decay": _UNIT,
}

_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               dict: "a mapping with string keys"}
_ITEM_NAMES = {int: "integers", float: "finite numbers"}
_BAD = object()


class _Loader(yaml.SafeLoader):
    """yaml.SafeLoader that also reads ``1e-5`` as a float (YAML 1.2), not as the string '1e-5'."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@cache
def _fields(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _base(tp: Any) -> Any:
    """``dict[str, Any]`` -> dict, ``tuple[int, ...]`` -> tuple, plain types unchanged."""
    return typing.get_origin(tp) or tp


def _unknown(what: str, name: Any, section: str, options: Sequence[str]) -> ConfigError:
    """'unknown key 'train.epoch' (did you mean 'train.epochs'? accepted: ...)'."""
    prefix = f"{section}." if section else ""
    elsewhere = [f"{s}.{name}" for s, cls in _SECTIONS.items() if s != section and name in _fields(cls)]
    close = difflib.get_close_matches(str(name), options, n=1)
    guess = elsewhere[0] if elsewhere else (prefix + close[0] if close else None)
    hint = f"did you mean '{guess}'? " if guess else ""
    return ConfigError(f"unknown {what} '{prefix}{name}' ({hint}accepted: {', '.join(sorted(options))})")


def _scalar(tp: Any, v: Any) -> Any:
    """``v`` converted to the plain type ``tp``, or ``_BAD``. bool and int never stand for each other."""
    if tp is bool:
        return v if isinstance(v, bool) else _BAD
    if tp is int:
        return v if isinstance(v, int) and not isinstance(v, bool) else _BAD
    if tp is float:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        return float(v) if ok else _BAD
    if tp is str:
        return v if isinstance(v, str) else _BAD
    if _base(tp) is dict:
        return copy.deepcopy(v) if isinstance(v, dict) and all(isinstance(k, str) for k in v) else _BAD
    raise TypeError(f"unsupported config annotation {tp!r}")


def _check(key: str, value: Any, tp: Any) -> Any:
    """``value`` checked against the annotation ``tp`` and the tables, converted to its type."""
    args = typing.get_args(tp)
    optional = _base(tp) in (typing.Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
    if _base(tp) is tuple:
        item = typing.get_args(tp)[0]
        out = tuple(_scalar(item, v) for v in value) if isinstance(value, (list, tuple)) else _BAD
        out, what = (_BAD if out is not _BAD and _BAD in out else out), f"a list of {_ITEM_NAMES[item]}"
    else:
        out, what = _scalar(tp, value), _TYPE_NAMES[_base(tp)]
    if out is _BAD:
        raise ConfigError(f"{key} must be {what}{' or null' if optional else ''}, got {value!r}")
    if key in _CHOICES and out not in _CHOICES[key]:
        raise ConfigError(f"{key} must be one of {', '.join(_CHOICES[key])}, got {value!r}")
    if key in _RULES and not _RULES[key][0](out):
        raise ConfigError(f"{key} must be {_RULES[key][1]}, got {value!r}")
    return out


def _check_cross(cfg: Config) -> None:
    """Constraints between fields that need no model."""
    if cfg.data.name != "synthetic" and cfg.data.root is None:
        raise ConfigError(f"data.root must be set when data.name is '{cfg.data.name}' "
                          f"(only synthetic needs no root), got null")
    for s in ("train", "gate"):
        sec = getattr(cfg, s)
        if sec.warmup_epochs >= sec.epochs:
            raise ConfigError(f"{s}.warmup_epochs must be less than {s}.epochs ({sec.epochs}), "
                              f"got {sec.warmup_epochs}")
    _check_gate_weights(cfg.gate)
    space, bias = cfg.gate.routing_space, cfg.gate.logit_bias
    if space is not None and bias is not None and len(space) != len(bias):
        raise ConfigError(f"gate.logit_bias must have one value per gate.routing_space choice "
                          f"({len(space)}), got {len(bias)}")


def _check_gate_weights(gate: GateConfig) -> None:
    """Refuse loss weights that give the gate's width head no gradient: every weight 0, or only
    the complexity term with a target no route exceeds (a route's cost is at most 1, the widest)."""
    if gate.sgs_weight > 0 or gate.task_weight > 0:
        return
    if gate.complexity_weight == 0:
        raise ConfigError("gate.sgs_weight, gate.task_weight and gate.complexity_weight are all 0, "
                          "so nothing would train the gate; set at least one of them above 0")
    if gate.complexity_target >= 1:
        raise ConfigError(f"gate.complexity_target must be below 1 when gate.sgs_weight and "
                          f"gate.task_weight are 0 (no route costs more than 1, so nothing would train "
                          f"the gate), got {gate.complexity_target}")


def config_from_dict(d: dict | None) -> Config:
    """Validate a ``{section: {key: value}}`` mapping (missing sections and keys take defaults)."""
    d = {} if d is None else d
    if not isinstance(d, dict):
        raise ConfigError(f"a config must be a mapping of sections ({_ACCEPTED_SECTIONS}), got {d!r}")
    for name in d:
        if name not in _SECTIONS:
            raise _unknown("section", name, "", _ACCEPTED_SECTIONS.split(", "))
    sections = {}
    for name, cls in _SECTIONS.items():
        raw = {} if d.get(name) is None else d[name]
        if not isinstance(raw, dict):
            raise ConfigError(f"section '{name}' must be a mapping of key: value, got {raw!r}")
        for key in raw:
            if key not in _fields(cls):
                raise _unknown("key", key, name, list(_fields(cls)))
        sections[name] = cls(**raw)
    return Config(**sections)


def config_to_dict(cfg: Config) -> dict:
    """Plain ``{section: {key: value}}`` of built-in types (tuples as lists); YAML/JSON-serialisable."""
    def plain(v: Any) -> Any:
        if isinstance(v, (tuple, list)):
            return [plain(x) for x in v]
        return {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else v
    return {s: {k: plain(getattr(getattr(cfg, s), k)) for k in _fields(cls)} for s, cls in _SECTIONS.items()}


def _apply_override(d: dict, override: str) -> None:
    """Set one ``section.key=value`` in the raw mapping ``d``; the value is parsed as YAML."""
    path, eq, text = override.partition("=")
    section, dot, name = path.strip().partition(".")
    if not eq or not section or not name or "." in name:
        raise ConfigError(f"override '{override}' needs the form section.key=value")
    try:
        value = _parse_yaml(text)
    except yaml.YAMLError:
        raise ConfigError(f"override '{override}' has a value that is not valid YAML") from None
    tp = _fields(_SECTIONS[section]).get(name) if section in _SECTIONS else None
    if tp in (str, str | None) and value is not None and not isinstance(value, str):
        value = text.strip()  # `output.dir=2024`, `data.auto_augment=on`: the text as written
    if d.get(section) is None:
        d[section] = {}
    if not isinstance(d[section], dict):
        raise ConfigError(f"section '{section}' must be a mapping of key: value, got {d[section]!r}")
    d[section][name] = value


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> Config:
    """Read the YAML file at ``path`` (None: all defaults), apply ``section.key=value`` overrides
    in order (values parsed as YAML: ``3``, ``[0, 1]``, ``null``), validate, return a Config.
    A missing ``path`` that names a shipped config (``configs/quickstart.yml``, ``quickstart.yml``,
    ``quickstart``) reads the one installed with dsnet; a path that exists always wins."""
    d: Any = {}
    if path is not None:
        path = _existing(path)
        try:
            with open(path, encoding="utf-8") as f:
                d = _parse_yaml(f.read())
        except OSError as e:
            raise ConfigError(f"config file '{path}' cannot be read ({e.strerror})") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config file '{path}' is not valid YAML "
                              f"({getattr(e, 'problem', None) or 'parse error'}{where})") from None
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections "
                              f"({_ACCEPTED_SECTIONS}), got {type(d).__name__}")
    return config_from_dict(_overridden(d, overrides))


def _existing(path: str | os.PathLike) -> str | os.PathLike:
    """``path`` when it exists (it always wins), else the shipped config it names (see dsnet.packaged)."""
    if os.path.lexists(path):
        return path
    shipped = packaged_config(path)
    if shipped is None:
        raise ConfigError(f"config file '{path}' does not exist and names no config shipped with dsnet "
                          f"(pass the path of a YAML file or one of: {', '.join(packaged_names()) or 'none'})")
    _log.info("config file '%s' is not in %s; using the one shipped with dsnet: %s", path, os.getcwd(), shipped)
    return shipped


def _overridden(d: dict, overrides: Sequence[str]) -> dict:
    """The raw mapping ``d`` with ``section.key=value`` overrides applied in order."""
    for override in [overrides] if isinstance(overrides, str) else overrides:
        _apply_override(d, override)
    return d


def apply_overrides(cfg: Config, overrides: Sequence[str]) -> Config:
    """A validated copy of ``cfg`` with ``section.key=value`` overrides applied, as ``load_config``
    applies them to a file (``dsnet evaluate CKPT train.batch_size=256`` on a checkpoint's config)."""
    return config_from_dict(_overridden(config_to_dict(cfg), overrides))


def config_yaml(cfg: Config) -> str:
    """``cfg`` as YAML, every key of every section; ``load_config`` of this text gives ``cfg`` back."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


def save_config(cfg: Config, path: str | os.PathLike) -> None:
    """Write ``cfg`` as YAML to ``path`` (via a temp file and rename); ``load_config`` reads it back equal."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(f"{path}.tmp", "w", encoding="utf-8") as f:
        f.write(config_yaml(cfg))
    os.replace(f"{path}.tmp", path)


def replace(cfg: Config, **changes: Any) -> Config:
    """A validated copy of ``cfg`` with ``changes`` keyed by ``"section.key"``:
    ``replace(cfg, **{"train.epochs": 3, "gate.routing_space": (0, 1)})``."""
    d = config_to_dict(cfg)
    for key, value in changes.items():
        section, dot, name = key.partition(".")
        if not dot or not name or "." in name:
            raise ConfigError(f"change '{key}' needs the form section.key")
        if section not in d:
            d[section] = {}
        d[section][name] = value
    return config_from_dict(d)


def check_root_used(cfg: Config, data_root: str | None, overrides: Sequence[str] = ()) -> None:
    """Refuse a dataset root given to a command that reads a checkpoint (``--data ROOT`` or a
    ``data.root=`` override) when ``cfg`` (the checkpoint's config with them applied) reads
    synthetic data, which has no root: the root would be ignored and the figures be synthetic."""
    given = data_root if data_root is not None else next(
        (o.partition("=")[2] for o in overrides if o.startswith("data.root=")), None)
    if given is not None and cfg.data.name == "synthetic":
        raise ConfigError(f"--data {given} would be ignored: this run was trained on synthetic data "
                          f"(data.name=synthetic); to use an image folder, also pass data.name=folder "
                          f"(e.g. data.name=folder --data {given})")
