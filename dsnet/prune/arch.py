"""Arbitrary architectures of a supernet: a width per channel space and a set of removed blocks.

The methods that *find* an architecture by pruning (Network Slimming, ``dsnet.prune.slimming``; Sparse
Structure Selection, ``dsnet.prune.sss``) leave widths that no route of the supernet has. An
``Architecture`` names them in the frame of ``dsnet.prune.channels``:

- ``widths``: one width per *channel space* of the supernet's largest route (a conv's output or a
  residual stream, as ``dsnet.prune.channel_spaces`` defines them), keyed by the module path of
  the first ConvBNAct that writes the space (``units.0`` is the stem and the first stream it
  starts, ``units.4.body.0`` a block's inner conv, ``units.7.shortcut`` a projection's stream);
- ``removed``: the indices (into ``supernet.units``) of removed residual blocks. Only a block with
  an identity shortcut can be removed; a removed block's inner spaces have no width.

The record (``to_dict``, JSON-able) also names the supernet and its constructor kwargs, so the
plain model can be rebuilt from it alone (``build_supernet`` then ``build_plain``)::

    {"format": "dsnet-architecture", "version": 1, "model": "ds_resnet20",
     "model_kwargs": {...}, "widths": {"units.0": 12, "units.1.body.0": 7, ...},
     "removed_blocks": [2]}

``build_plain`` is ``DSNet.extract`` at free widths: each unit's dense twin, with the leading
``width`` channels of every space (after ``lead`` has permuted the chosen channels to the front,
as ``dsnet.prune.prune_to`` does) and the largest route's BN statistics. ``arch_cost`` is the
analytic MAdds and parameter count (the convention of ``dsnet.models.blocks``), equal to the
plain model's own.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from dsnet.errors import UserError
from dsnet.models.blocks import Bottleneck, ConvBNAct, DenseBasicBlock, DenseBottleneck, Residual, Unit
from dsnet.models.net import DenseNet, DSNet, RouteCost, init_weights
from dsnet.models.spec import create
from dsnet.prune.channels import ChannelSpace, channel_spaces

__all__ = ["FORMAT", "VERSION", "Architecture", "architecture", "named_spaces", "unit_of", "removable_blocks",
           "full_architecture", "subnet_architecture", "check_architecture", "lead", "build_plain", "fresh_plain",
           "arch_cost", "build_supernet", "load_architecture", "save_architecture", "load_arch_state"]

FORMAT, VERSION = "dsnet-architecture", 1
_KEYS = ("format", "version", "model", "model_kwargs", "widths", "removed_blocks")


@dataclass(frozen=True)
class Architecture:
    """A supernet (name, kwargs), a width per channel space and the removed residual blocks."""

    model: str
    model_kwargs: dict[str, Any]
    widths: dict[str, int]
    removed: tuple[int, ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """The JSON-able record stored in checkpoints and ``--static-arch`` files."""
        return {"format": FORMAT, "version": VERSION, "model": self.model, "model_kwargs": dict(self.model_kwargs),
                "widths": dict(self.widths), "removed_blocks": sorted(self.removed)}

    @classmethod
    def from_dict(cls, record: Any, source: str = "the architecture") -> "Architecture":
        """Parse ``to_dict``'s record; UserError naming ``source`` and what is wrong."""
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise UserError(f"{source} is not a dsnet architecture: expected a JSON object with "
                            f"\"format\": \"{FORMAT}\" (as dsnet writes them)")
        unknown, missing = sorted(set(record) - set(_KEYS)), [k for k in _KEYS if k not in record]
        if unknown or missing:
            raise UserError(f"{source} has unknown keys {unknown} and lacks keys {missing}; an architecture "
                            f"has exactly {', '.join(_KEYS)}")
        if not isinstance(record["version"], int) or record["version"] > VERSION:
            raise UserError(f"{source} has version {record['version']!r}; this dsnet reads versions up to {VERSION}")
        widths, removed = record["widths"], record["removed_blocks"]
        if not isinstance(record["model"], str) or not isinstance(record["model_kwargs"], dict):
            raise UserError(f"{source}: 'model' must be a dsnet model name and 'model_kwargs' an object")
        if not isinstance(widths, dict) or not all(_is_int(w) and w >= 1 for w in widths.values()):
            raise UserError(f"{source}: 'widths' must map channel-space names to positive integers, got {widths!r}")
        if (not isinstance(removed, list) or not all(_is_int(i) and i >= 0 for i in removed)
                or len(set(removed)) != len(removed)):
            raise UserError(f"{source}: 'removed_blocks' must be a list of distinct unit indices, got {removed!r}")
        return cls(record["model"], dict(record["model_kwargs"]), dict(widths), tuple(sorted(removed)))


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---- the supernet's channel spaces, by name -----------------------------------------------------

def named_spaces(supernet: DSNet) -> dict[str, ChannelSpace]:
    """The channel spaces of ``supernet``'s largest route, in ``channel_spaces`` order, keyed by
    the module path of the first ConvBNAct writing each. A space's full width is
    ``space.writers[0].shape[0]`` (its ``width`` field is static subnet 0's)."""
    names = {id(p): n.removesuffix(".conv.weight") for n, p in supernet.named_parameters()}
    return {names[id(s.writers[0])]: s for s in channel_spaces(supernet, 0)}


def unit_of(name: str) -> int:
    """The index (into ``supernet.units``) of the unit a channel space's name points into."""
    return int(name.split(".")[1])


def removable_blocks(supernet: DSNet) -> list[int]:
    """Indices of the residual blocks with an identity shortcut: the ones that can be removed."""
    return [i for i, u in enumerate(supernet.units) if isinstance(u, Residual) and u.shortcut is None]


def architecture(supernet: DSNet, widths: dict[str, int], removed: Sequence[int] = ()) -> Architecture:
    """An architecture of ``supernet`` (its name and kwargs, tuples as JSON's lists)."""
    kwargs = {k: list(v) if isinstance(v, tuple) else v for k, v in supernet.model_kwargs.items()}
    return Architecture(supernet.model_name, kwargs, dict(widths), tuple(sorted(removed)))


def full_architecture(supernet: DSNet, removed: Sequence[int] = ()) -> Architecture:
    """The largest route as an architecture: every space at full width, blocks ``removed``
    (unit indices) removed with their inner spaces."""
    return architecture(supernet, {n: s.writers[0].shape[0] for n, s in named_spaces(supernet).items()
                              if unit_of(n) not in removed}, removed)


def subnet_architecture(supernet: DSNet, subnet: int) -> Architecture:
    """Static subnet ``subnet``'s shape as an architecture."""
    names = list(named_spaces(supernet))
    return architecture(supernet, {n: s.width for n, s in zip(names, channel_spaces(supernet, subnet))})


def check_architecture(arch: Architecture, supernet: DSNet, source: str = "the architecture") -> None:
    """UserError unless ``arch`` fits ``supernet``: removable blocks only, one width in 1..full for
    exactly the spaces of the kept network."""
    removable = removable_blocks(supernet)
    bad = [i for i in arch.removed if i not in removable]
    if bad:
        raise UserError(f"{source}: units {bad} of {arch.model} are not residual blocks with an identity "
                        f"shortcut; the removable blocks are {removable}")
    spaces = {n: s for n, s in named_spaces(supernet).items() if unit_of(n) not in arch.removed}
    unknown, missing = sorted(set(arch.widths) - set(spaces)), [n for n in spaces if n not in arch.widths]
    if unknown or missing:
        raise UserError(f"{source}: {arch.model} with blocks {list(arch.removed)} removed has the channel "
                        f"spaces {list(spaces)}; unknown: {unknown}, missing: {missing}")
    for name, space in spaces.items():
        full = space.writers[0].shape[0]
        if not 1 <= arch.widths[name] <= full:
            raise UserError(f"{source}: channel space {name} has {full} channels in {arch.model}; its width "
                            f"must be in 1..{full}, got {arch.widths[name]}")


# ---- the plain model ----------------------------------------------------------------------------

@torch.no_grad()
def lead(space: ChannelSpace, keep: Tensor) -> None:
    """Permute every tensor of ``space`` so that channels ``keep`` (indices, in order) come first;
    the network's function is unchanged (``dsnet.prune.channels``'s permutation)."""
    rest = torch.ones(space.writers[0].shape[0], dtype=torch.bool, device=keep.device)
    rest[keep] = False
    order = torch.cat([keep, rest.nonzero().flatten()])
    for tensor, dim in space.members:
        tensor.copy_(tensor.index_select(dim, order))


def _out_widths(supernet: DSNet, arch: Architecture) -> dict[int, int]:
    """id(conv weight) -> the width of the space it writes (or, depthwise, runs in)."""
    out: dict[int, int] = {}
    for name, space in named_spaces(supernet).items():
        for tensor, dim in space.members:
            if dim == 0 and name in arch.widths:
                out[id(tensor)] = arch.widths[name]
    return out


def _kept_units(supernet: DSNet, arch: Architecture) -> list[Unit]:
    return [u for i, u in enumerate(supernet.units) if i not in arch.removed]


def _conv_bn(unit: ConvBNAct, in_c: int, out: dict[int, int]) -> tuple[nn.Sequential, int]:
    """A ConvBNAct's dense twin at input width ``in_c`` (largest-route statistics) and its output width."""
    out_c = in_c if unit.conv.depthwise else out[id(unit.conv.weight)]
    return unit.dense_at(in_c, out_c, True), out_c


def _dense_unit(unit: Unit, c: int, out: dict[int, int]) -> tuple[nn.Module, int]:
    if isinstance(unit, ConvBNAct):
        return _conv_bn(unit, c, out)
    if isinstance(unit, Residual):
        steps, x = [], c
        for step in unit.body:
            layer, x = _conv_bn(step, x, out)
            steps.append(layer)
        shortcut = _conv_bn(unit.shortcut, c, out)[0] if unit.shortcut is not None else None
        block = DenseBottleneck if isinstance(unit, Bottleneck) else DenseBasicBlock
        return block(nn.Sequential(*steps), shortcut), x
    return unit.dense(c, -1, True), c  # width preserving: squeeze-excite, the gate's attention, max pooling


def build_plain(supernet: DSNet, arch: Architecture, keep: Mapping[str, Tensor] | None = None) -> DenseNet:
    """``arch`` as a plain model holding ``supernet``'s weights: in every space the leading
    ``width`` channels, or, with ``keep`` (space name -> indices), those channels (``supernet``
    is then permuted in place, its function unchanged), and the largest route's BN statistics."""
    check_architecture(arch, supernet)
    if keep is not None:
        for name, space in named_spaces(supernet).items():
            if name in keep:
                lead(space, keep[name])
    out, layers, c = _out_widths(supernet, arch), [], supernet.in_chans
    for unit in _kept_units(supernet, arch):
        layer, c = _dense_unit(unit, c, out)
        layers.append(layer)
    return DenseNet(nn.Sequential(*layers), supernet.classifier.dense(c), supernet.drop_rate).train(supernet.training)


def fresh_plain(supernet: DSNet, arch: Architecture) -> DenseNet:
    """``arch`` as a plain model, freshly initialised for its own shape (Scratch-E / Scratch-B)."""
    model = build_plain(supernet, arch)
    init_weights(model, model.fc)
    return model


# ---- cost -----------------------------------------------------------------------------------------

def _conv_bn_cost(unit: ConvBNAct, in_c: int, hw: tuple[int, int], out: dict[int, int]):
    out_c = in_c if unit.conv.depthwise else out[id(unit.conv.weight)]
    madds, params, hw = unit.cost_at(in_c, out_c, hw)
    return madds, params, hw, out_c


def _unit_cost(unit: Unit, c: int, hw: tuple[int, int], out: dict[int, int]):
    """(MAdds, params, output hw, output width) of one kept unit at input width ``c``."""
    if isinstance(unit, ConvBNAct):
        return _conv_bn_cost(unit, c, hw, out)
    if isinstance(unit, Residual):
        madds = params = 0
        x, x_hw = c, hw
        for step in unit.body:
            m, p, x_hw, x = _conv_bn_cost(step, x, x_hw, out)
            madds, params = madds + m, params + p
        if unit.shortcut is not None:
            m, p, _, _ = _conv_bn_cost(unit.shortcut, c, hw, out)
            madds, params = madds + m, params + p
        return madds, params, x_hw, x
    m, p, hw = unit.cost(c, -1, hw)
    return m, p, hw, c


def arch_cost(supernet: DSNet, arch: Architecture, input_size: Sequence[int] | None = None) -> RouteCost:
    """MAdds of one sample of ``input_size`` (C, H, W; default the supernet's) and parameters of
    ``arch``'s plain model, by ``DSNet.route_cost``'s convention (convs, linear layers, average
    pooling; BN parameters counted, its statistics not)."""
    size = tuple(input_size or supernet.default_input_size)
    if len(size) != 3 or size[0] != supernet.in_chans or min(size) < 1:
        raise ValueError(f"input_size must be (C, H, W) with C = {supernet.in_chans}, got {list(size)}")
    check_architecture(arch, supernet)
    out, madds, params = _out_widths(supernet, arch), 0, 0
    c, hw = supernet.in_chans, (size[1], size[2])
    for unit in _kept_units(supernet, arch):
        m, p, hw, c = _unit_cost(unit, c, hw, out)
        madds, params = madds + m, params + p
    k = supernet.num_classes
    return RouteCost(madds + c * hw[0] * hw[1] + c * k, params + c * k + k)


# ---- files and checkpoints ----------------------------------------------------------------------

def build_supernet(arch: Architecture, source: str = "the architecture") -> DSNet:
    """The supernet ``arch`` names, built from its kwargs; UserError if dsnet cannot build it."""
    return create(arch.model, arch.model_kwargs, source)


def load_architecture(path: str | os.PathLike, source: str | None = None) -> tuple[Architecture, DSNet]:
    """Read a ``--static-arch`` file: (the architecture, its supernet). UserError naming the file
    (as ``source``, default ``--static-arch PATH``) when it is missing, not JSON, not an
    architecture, or does not fit its supernet."""
    path = Path(path)
    source = source or f"--static-arch {path}"
    if not path.is_file():
        raise UserError(f"{source} does not exist" if not path.exists() else f"{source} is not a file")
    try:
        record = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"{source} is not JSON ({err}); write it with dsnet "
                        f"(dsnet.prune.arch.save_architecture) or as its docs describe") from None
    arch = Architecture.from_dict(record, source)
    supernet = build_supernet(arch, source)
    check_architecture(arch, supernet, source)
    return arch, supernet


def save_architecture(arch: Architecture, path: str | os.PathLike) -> Path:
    """Write ``arch``'s record as JSON to ``path`` (a temporary file renamed over it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(arch.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def load_arch_state(state: dict[str, Any]) -> tuple[DenseNet, DSNet, Architecture]:
    """(the plain model of a checkpoint holding an ``architecture`` record and its ``model``
    weights, in eval mode; the supernet it was cut from; the architecture)."""
    source = "the checkpoint's architecture"
    arch = Architecture.from_dict(state.get("architecture"), source)
    supernet = build_supernet(arch, source)
    model = build_plain(supernet, arch)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise UserError(f"checkpoint weights do not fit its architecture of {arch.model}: "
                        f"{str(err).splitlines()[-1].strip()}") from None
    return model.eval(), supernet, arch
