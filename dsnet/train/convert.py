"""``dsnet convert``: published weights -> a dsnet stage-one checkpoint.

Two sources are understood:

- ``torchvision-resnet50``: a torchvision ``resnet50`` state dict (v1 or v2 weights) ->
  ``ds_resnet50``. The weights fill the largest route, which has ResNet-50's shape; every
  narrower width slices them. Each width's BN statistics start as the leading entries of the
  full-width ones, so ``dsnet recalibrate`` should run next. The gate (ds_resnet50's channel
  attention before the second stage, absent from ResNet-50) starts as a constant 0.5 scale and
  the two convolutions that read its output are doubled: the largest route computes what
  ResNet-50 computes, and the attention can still learn (a sigmoid held at 1 would not).
- ``ds-net-release``: the DS-Net release checkpoint (``slimmable_mbnet_v1_bn_uniform``, e.g.
  ``DS_MBNet-70_1.pth.tar``) -> ``ds_mobilenet_v1``. Every tensor maps: convolutions, the
  per-width BN statistics (the release keeps one BN per width, ``aux_bn.<i>``; its widest one
  serves both dsnet's widest-width row and its largest-route row), the shared BN affine, every
  squeeze-excite, the gate's shared layer, attention head and width head, and the classifier.

Both accept a bare state dict or a dict holding it (``state_dict``, ``model``; ``--ema`` picks
``state_dict_ema``), with or without a ``module.`` prefix. Anything else is refused with one
sentence naming the first key or shape that does not fit, and nothing is written.

The output is an ordinary stage-one checkpoint (``dsnet.load_checkpoint``, ``train_gate.py
--supernet``, ``train.init_from``, ``dsnet evaluate / recalibrate / export / bench``) whose
``source`` entry records the file name, format and sha256 of what it came from.
"""
from __future__ import annotations

import argparse
import hashlib
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Iterator

import timm
import torch
from torch import Tensor

from dsnet.config import Config, DataConfig, ModelConfig, config_to_dict
from dsnet.errors import UserError
from dsnet.layers import DSBatchNorm2d
from dsnet.models.blocks import Bottleneck, ConvBNAct, GateUnit, MaxPoolUnit, SEUnit
from dsnet.models.mobilenet_v1 import DS_MBNET_STAGES
from dsnet.models.net import DSNet
from dsnet.train.checkpoint import save_checkpoint

__all__ = ["SOURCES", "ConvertError", "convert", "read_state_dict", "torchvision_resnet50_to_dsnet",
           "release_to_dsnet", "file_sha256"]


class ConvertError(UserError):
    """The source file is not what ``--from`` says, or cannot be read; nothing was written."""


StateDict = dict[str, Tensor]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_state_dict(path: Path, ema: bool = False) -> tuple[StateDict, str]:
    """(state dict, the entry it came from) of a checkpoint file, loaded with ``weights_only``.

    Accepts a bare state dict or a dict with ``state_dict`` / ``model`` (``state_dict_ema`` with
    ``ema``); a ``module.`` prefix is removed. The release's checkpoints also pickle the training
    script's ``argparse.Namespace``, the one non-tensor class allowed here.
    """
    if not path.is_file():
        raise ConvertError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise ConvertError(f"{path} holds objects other than tensors and plain data and was refused: "
                           f"{str(err).splitlines()[0]}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise ConvertError(f"{path} is truncated or corrupt and cannot be read ({type(err).__name__})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint dict")
    wanted = ("state_dict_ema",) if ema else ("state_dict", "model")
    entry = next((k for k in wanted if isinstance(obj.get(k), dict)), None)
    if entry is None and ema:
        raise ConvertError(f"--ema: {path} has no 'state_dict_ema' entry (it has: {', '.join(map(str, obj)) or 'nothing'})")
    weights = obj[entry] if entry is not None else obj
    if not weights or not all(isinstance(v, Tensor) for v in weights.values()):
        bad = next((k for k, v in weights.items() if not isinstance(v, Tensor)), None)
        raise ConvertError(f"{path} is not a state dict: entry '{bad}' is a {type(weights.get(bad)).__name__}, "
                           f"not a tensor" if bad is not None else f"{path} holds no tensors")
    if all(k.startswith("module.") for k in weights):
        weights = {k[len("module."):]: v for k, v in weights.items()}
    return dict(weights), entry or "bare state dict"


class _Mapper:
    """Fills a dsnet state dict from a source state dict, one checked tensor at a time."""

    def __init__(self, source: StateDict, target: StateDict, what: str) -> None:
        self.source, self.target, self.what = source, target, what
        self.used: set[str] = set()
        self.filled: set[str] = set()

    def take(self, key: str, shape: tuple[int, ...] | None = None) -> Tensor:
        """The source tensor ``key``, checked against ``shape``; marks it as used."""
        if key not in self.source:
            first = next(iter(self.source))
            raise ConvertError(f"the source is not a {self.what}: it has no '{key}' (its first key is '{first}')")
        t = self.source[key]
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ConvertError(f"'{key}' has shape {list(t.shape)}, {self.what} needs {list(shape)} "
                               f"(a checkpoint of another architecture or width table?)")
        self.used.add(key)
        return t

    def has(self, key: str) -> bool:
        return key in self.source

    def put(self, key: str, value: Tensor) -> None:
        """Write ``value`` into the dsnet tensor ``key`` (same shape required)."""
        if tuple(value.shape) != tuple(self.target[key].shape):
            raise ConvertError(f"'{key}' would get shape {list(value.shape)}, dsnet needs {list(self.target[key].shape)}")
        self.target[key] = value.to(self.target[key].dtype).clone()
        self.filled.add(key)

    def conv(self, dst: str, src: str, scale: float = 1.0) -> None:
        self.put(dst, self.take(src, tuple(self.target[dst].shape)) * scale)

    def finish(self, unfilled_ok: Callable[[str], bool] = lambda key: False) -> StateDict:
        """The filled state dict; refuses source keys left over and dsnet keys left empty."""
        extra = [k for k in self.source if k not in self.used]
        if extra:
            raise ConvertError(f"the source has a key a {self.what} does not have: '{extra[0]}' "
                               f"({len(extra)} such keys)")
        empty = [k for k in self.target if k not in self.filled and not unfilled_ok(k)]
        if empty:
            raise ConvertError(f"nothing in the source fills dsnet's '{empty[0]}'")
        return self.target


def _fill_bn(m: _Mapper, dst: str, bn: DSBatchNorm2d, rows: list[str], affine: str, full: bool = False) -> None:
    """DSBatchNorm2d ``dst`` from per-width BN prefixes ``rows`` (one per dsnet row: widths
    ``bn.choices``, then the largest route) and the affine BN prefix ``affine``. A row's source
    statistics have that row's width, or the widest (``full``), of which the leading entries are kept."""
    widest = bn.choices[-1]
    m.put(f"{dst}.weight", m.take(f"{affine}.weight", (widest,)))
    m.put(f"{dst}.bias", m.take(f"{affine}.bias", (widest,)))
    mean, var = torch.zeros(len(rows), widest), torch.ones(len(rows), widest)
    tracked = torch.zeros(len(rows), dtype=torch.long)
    for r, (src, width) in enumerate(zip(rows, (*bn.choices, widest))):
        shape = (widest if full else width,)
        mean[r, :width] = m.take(f"{src}.running_mean", shape)[:width]
        var[r, :width] = m.take(f"{src}.running_var", shape)[:width]
        if m.has(f"{src}.num_batches_tracked"):
            tracked[r] = m.take(f"{src}.num_batches_tracked", ())
    m.put(f"{dst}.running_mean", mean)
    m.put(f"{dst}.running_var", var)
    m.put(f"{dst}.num_batches_tracked", tracked)


def _conv_bn(m: _Mapper, dst: str, unit: ConvBNAct, conv: str, bn: str, scale: float = 1.0) -> None:
    """ConvBNAct ``dst`` from a plain conv and a plain full-width BN (every row starts from it)."""
    m.conv(f"{dst}.conv.weight", f"{conv}.weight", scale)
    _fill_bn(m, f"{dst}.bn", unit.bn, [bn] * (len(unit.bn.choices) + 1), bn, full=True)


# ---- torchvision resnet50 -> ds_resnet50 --------------------------------------------------------
def _resnet_blocks(model: DSNet) -> Iterator[tuple[int, Bottleneck, str]]:
    """(unit index, block, torchvision prefix ``layerL.b``) of every bottleneck, in order."""
    layer, b = 0, 0
    for i, unit in enumerate(model.units):
        if isinstance(unit, Bottleneck):
            if unit.projection:
                layer, b = layer + 1, 0
            yield i, unit, f"layer{layer}.{b}"
            b += 1


def torchvision_resnet50_to_dsnet(source: StateDict, model: DSNet) -> StateDict:
    """A ds_resnet50 state dict whose largest route computes torchvision's resnet50 ``source``."""
    m = _Mapper(source, dict(model.state_dict()), "torchvision resnet50 state dict")
    units = list(model.units)
    if not isinstance(units[0], ConvBNAct) or not isinstance(units[1], MaxPoolUnit):
        raise ConvertError("the target model has no ResNet stem (conv, BN, max pool)")
    _conv_bn(m, "units.0", units[0], "conv1", "bn1")
    after_gate = model.gate_index + 1
    for i, block, tv in _resnet_blocks(model):
        scale = 2.0 if i == after_gate else 1.0  # undoes the gate's constant 0.5 (exact in floating point)
        for j, step in enumerate(block.body):
            _conv_bn(m, f"units.{i}.body.{j}", step, f"{tv}.conv{j + 1}", f"{tv}.bn{j + 1}",
                     scale=scale if j == 0 else 1.0)
        if block.shortcut is not None:
            _conv_bn(m, f"units.{i}.shortcut", block.shortcut, f"{tv}.downsample.0", f"{tv}.downsample.1", scale=scale)
    gate = f"units.{model.gate_index}.gate"
    m.put(f"{gate}.expand.weight", torch.zeros_like(m.target[f"{gate}.expand.weight"]))
    m.put(f"{gate}.expand.bias", torch.zeros_like(m.target[f"{gate}.expand.bias"]))  # sigmoid(0) = 0.5
    m.put("classifier.weight", m.take("fc.weight", tuple(m.target["classifier.weight"].shape)))
    m.put("classifier.bias", m.take("fc.bias", tuple(m.target["classifier.bias"].shape)))
    # the gate's shared layer and width head have no ResNet-50 counterpart: they keep dsnet's init
    return m.finish(lambda key: key.startswith((f"{gate}.reduce.", f"{gate}.width_head.")))


# ---- DS-Net release (slimmable_mbnet_v1_bn_uniform) -> ds_mobilenet_v1 --------------------------
def _release_blocks(model: DSNet) -> Iterator[tuple[int, str]]:
    """(index of the block's depthwise unit, release prefix) of every depthwise-separable block.
    dsnet runs a block as three units: depthwise conv, squeeze-excite (or the gate), pointwise."""
    i = 1
    for s, spec in enumerate(DS_MBNET_STAGES):
        for d in range(spec.depth):
            yield i, f"blocks.{s}." + ("first_block" if d == 0 else f"residual_blocks.{d - 1}")
            i += 3
    if i != len(model.units):
        raise ConvertError(f"the target model has {len(model.units)} units, the release layout {i}")


def _release_bn(m: _Mapper, dst: str, unit: ConvBNAct, conv: str, bn: str) -> None:
    """One BN per width in the release (``aux_bn.<i>``, the widest one affine); its widest BN
    fills both dsnet's widest row and its largest-route row."""
    n = len(unit.bn.choices)
    rows = [f"{bn}.aux_bn.{i}" for i in range(n)] + [f"{bn}.aux_bn.{n - 1}"]
    m.conv(f"{dst}.conv.weight", f"{conv}.weight")
    _fill_bn(m, f"{dst}.bn", unit.bn, rows, rows[-1])


def release_to_dsnet(source: StateDict, model: DSNet) -> StateDict:
    """A ds_mobilenet_v1 state dict holding the release's ``source`` (every tensor mapped)."""
    m = _Mapper(source, dict(model.state_dict()), "DS-Net release checkpoint (slimmable_mbnet_v1_bn_uniform)")
    units = list(model.units)
    _release_bn(m, "units.0", units[0], "conv_stem", "bn1")
    for i, rel in _release_blocks(model):
        dw, attention, pw = units[i], units[i + 1], units[i + 2]
        _release_bn(m, f"units.{i}", dw, f"{rel}.conv_dw", f"{rel}.bn1")
        se = f"units.{i + 1}." + ("gate" if isinstance(attention, GateUnit) else "se")
        for part, rel_part in (("reduce", "conv_reduce"), ("expand", "conv_expand")):
            m.conv(f"{se}.{part}.weight", f"{rel}.gate.{rel_part}.weight")
            m.conv(f"{se}.{part}.bias", f"{rel}.gate.{rel_part}.bias")
        if isinstance(attention, GateUnit):
            head = m.target[f"{se}.width_head.weight"]
            if m.has(f"{rel}.gate.gate.0.weight"):  # the release's width head (no bias)
                m.put(f"{se}.width_head.weight", m.take(f"{rel}.gate.gate.0.weight", (*head.shape, 1, 1)).flatten(1))
            else:
                m.put(f"{se}.width_head.weight", torch.zeros_like(head))
            m.put(f"{se}.width_head.bias", torch.zeros(head.shape[0]))
        elif not isinstance(attention, SEUnit):
            raise ConvertError(f"unit {i + 1} of the target model is not a squeeze-excite")
        _release_bn(m, f"units.{i + 2}", pw, f"{rel}.conv_pw", f"{rel}.bn2")
    m.put("classifier.weight", m.take("classifier.weight", tuple(m.target["classifier.weight"].shape)))
    m.put("classifier.bias", m.take("classifier.bias", tuple(m.target["classifier.bias"].shape)))
    return m.finish()


# ---- the command ---------------------------------------------------------------------------------
# --from name -> (dsnet model, mapping, the source key that holds the class count, interpolation)
SOURCES: dict[str, tuple[str, Callable[[StateDict, DSNet], StateDict], str, str]] = {
    "torchvision-resnet50": ("ds_resnet50", torchvision_resnet50_to_dsnet, "fc.weight", "bilinear"),
    "ds-net-release": ("ds_mobilenet_v1", release_to_dsnet, "classifier.weight", "bicubic"),
}


def _build(name: str, num_classes: int) -> DSNet:
    """The target supernet, initialised from a fixed seed (the tensors no source fills, such as
    ds_resnet50's gate, come out the same on every conversion)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model(name, num_classes=num_classes)


def convert(src: str | Path, out: str | Path, fmt: str, ema: bool = False, data_root: str | None = None) -> str:
    """Convert ``src`` (a ``fmt`` checkpoint, see ``SOURCES``) into the dsnet stage-one checkpoint
    ``out``; returns what to print. Raises ConvertError (nothing written) on bad input."""
    if fmt not in SOURCES:
        raise ConvertError(f"--from must be one of {', '.join(SOURCES)}, got '{fmt}'")
    src, out = Path(src), Path(out)
    if out.exists() or out.is_symlink():
        raise ConvertError(f"{out} exists; dsnet convert never overwrites, choose another -o")
    name, mapping, classifier, interpolation = SOURCES[fmt]
    weights, entry = read_state_dict(src, ema)
    head = weights.get(classifier)
    model = _build(name, head.shape[0] if head is not None and head.dim() == 2 else 1000)
    state_dict = mapping(weights, model)
    model.load_state_dict(state_dict)
    cfg = Config(model=ModelConfig(name=name),
                 data=DataConfig(name="folder", root=data_root or "/data/imagenet", input_size=224,
                                 interpolation=interpolation, crop_pct=0.875))
    source = {"file": src.name, "format": fmt, "entry": entry, "sha256": file_sha256(src)}
    save_checkpoint({"stage": "supernet", "model_name": name, "model_kwargs": dict(model.model_kwargs),
                     "model": model.state_dict(), "ema": None, "epoch": 0, "step": 0, "classes": None,
                     "config": config_to_dict(cfg), "metrics": {}, "source": source}, out)
    lines = [f"converted {src.name} ({fmt}, {entry}, sha256 {source['sha256'][:16]}...) -> {out} ({name}, "
             f"{len(state_dict)} tensors)"]
    if fmt == "torchvision-resnet50":
        lines.append(f"next: dsnet recalibrate {out} --data IMAGENET_ROOT -o {out.with_name(out.stem + '-recal.pth')}"
                     "  (every width's BN statistics are still the full width's leading entries)")
    return "\n".join(lines)
