"""DS-ResNets: CIFAR basic-block supernets (ds_resnet20 / ds_resnet56) and an ImageNet
bottleneck ResNet-50 supernet (ds_resnet50).

The DS-ResNet code of the paper was never released; dsnet's choices, following the DS-MBNet
layout so that one route rule serves every model:

- group 0 (stem and the first stage) has ``base_mults`` (default 0.5x, 1.0x); static subnets and
  the dynamic model run it at 0.5x, the largest route (the stage-one teacher) at 1.0x;
- group 1 (every later stage) has ``width_mults`` (default 0.25x, 0.5x, 0.75x, 1.0x): static
  subnet i runs it at ``width_mults[i]``; it is the gated group;
- the gate sits at the start of the second stage, on the first stage's features, and routes
  among all of group 1's choices by default. ``gate_stage=2`` (CIFAR models) moves it to the
  start of the third stage: the second stage joins group 0, so the gate decides on deeper
  features and routes a smaller share of the network (see docs/results.md: on CIFAR-10 a gate
  after the first stage sees too little to tell easy images from hard ones).

With every multiplier at 1.0 the network is the standard one: ds_resnet50's largest route has the
shape of torchvision's resnet50 (v1.5: stride on the 3x3, 1x1 projection shortcuts), plus the
gate's attention. The CIFAR models use 1x1 projection shortcuts (He et al.'s option B).
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from dsnet.models.blocks import BasicBlock, Bottleneck, ConvBNAct, GateUnit, MaxPoolUnit, Unit
from dsnet.models.net import DSNet
from dsnet.models.spec import StageSpec, group_sizes, register, scale

__all__ = ["resnet_stages", "build_resnet", "ds_resnet20", "ds_resnet56", "ds_resnet50"]

Mults = Sequence[float]


def resnet_stages(widths: Sequence[int], depths: Sequence[int], base_mults: Mults, width_mults: Mults,
                  expansion: int = 1, gate_stage: int = 1) -> tuple[StageSpec, ...]:
    """Stage table: stages before ``gate_stage`` in group 0 (``base_mults``), the gate at the start
    of stage ``gate_stage``, it and the later stages in gated group 1."""
    if not 1 <= gate_stage < len(widths):
        raise ValueError(f"gate_stage must be in 1..{len(widths) - 1} (the gate needs a stage before "
                         f"it and the stages it routes after it), got {gate_stage}")
    stages = []
    for i, (w, d) in enumerate(zip(widths, depths)):
        base = i < gate_stage
        mults = tuple(base_mults if base else width_mults)
        stages.append(StageSpec(choices=scale(w * expansion, mults), depth=d, stride=1 if i == 0 else 2,
                                group=0 if base else 1, gated=i == gate_stage,
                                mid=scale(w, mults) if expansion > 1 else None))
    return tuple(stages)


def build_resnet(stem: Sequence[int], stages: Sequence[StageSpec], num_classes: int,
                 routing_space: Sequence[int] | None, imagenet_stem: bool, drop_rate: float = 0.0,
                 in_chans: int = 3, input_size: int = 224, gate_ratio: float = 0.25) -> DSNet:
    """A residual supernet from a stem width list and a stage table."""
    units: list[Unit] = [ConvBNAct((in_chans,), stem, 7 if imagenet_stem else 3,
                                   2 if imagenet_stem else 1, nn.ReLU, group=0)]
    if imagenet_stem:
        units.append(MaxPoolUnit())
    in_choices = tuple(stem)
    space = tuple(routing_space) if routing_space is not None else tuple(range(len(stages[-1].choices)))
    for spec in stages:
        if spec.gated:
            units.append(GateUnit(in_choices, len(space), gate_ratio))
        for d in range(spec.depth):
            stride = spec.stride if d == 0 else 1
            if spec.mid is None:
                units.append(BasicBlock(in_choices, spec.choices, stride, spec.group))
            else:
                units.append(Bottleneck(in_choices, spec.mid, spec.choices, stride, spec.group))
            in_choices = spec.choices
    sizes = group_sizes([(0, len(stem))] + [(s.group, len(s.choices)) for s in stages])
    return DSNet(units, num_classes, sizes, space, drop_rate, in_chans, (in_chans, input_size, input_size))


def _cifar(n: int, num_classes: int, base_mults: Mults, width_mults: Mults,
           routing_space: Sequence[int] | None, drop_rate: float, in_chans: int, gate_stage: int) -> DSNet:
    stages = resnet_stages((16, 32, 64), (n, n, n), base_mults, width_mults, gate_stage=gate_stage)
    # the gate's hidden layer is as wide as its input (16 units at full width, not 4): it must
    # tell easy from hard images, not only reweight channels
    return build_resnet(scale(16, tuple(base_mults)), stages, num_classes, routing_space, False,
                        drop_rate, in_chans, 32, gate_ratio=1.0)


@register
def ds_resnet20(num_classes: int = 10, base_mults: Mults = (0.5, 1.0),
                width_mults: Mults = (0.25, 0.5, 0.75, 1.0), routing_space: Sequence[int] | None = None,
                drop_rate: float = 0.0, in_chans: int = 3, gate_stage: int = 1) -> DSNet:
    """CIFAR ResNet-20 supernet (32x32 inputs), widths 0.25x-1.0x of (16, 32, 64)."""
    return _cifar(3, num_classes, base_mults, width_mults, routing_space, drop_rate, in_chans, gate_stage)


@register
def ds_resnet56(num_classes: int = 10, base_mults: Mults = (0.5, 1.0),
                width_mults: Mults = (0.25, 0.5, 0.75, 1.0), routing_space: Sequence[int] | None = None,
                drop_rate: float = 0.0, in_chans: int = 3, gate_stage: int = 1) -> DSNet:
    """CIFAR ResNet-56 supernet (32x32 inputs), widths 0.25x-1.0x of (16, 32, 64)."""
    return _cifar(9, num_classes, base_mults, width_mults, routing_space, drop_rate, in_chans, gate_stage)


@register
def ds_resnet50(num_classes: int = 1000, base_mults: Mults = (0.5, 1.0),
                width_mults: Mults = (0.25, 0.5, 0.75, 1.0), routing_space: Sequence[int] | None = None,
                drop_rate: float = 0.0, in_chans: int = 3) -> DSNet:
    """ImageNet ResNet-50 supernet; its largest route has torchvision resnet50's shape."""
    stages = resnet_stages((64, 128, 256, 512), (3, 4, 6, 3), base_mults, width_mults, expansion=4)
    return build_resnet(scale(64, tuple(base_mults)), stages, num_classes, routing_space, True,
                        drop_rate, in_chans, 224)
