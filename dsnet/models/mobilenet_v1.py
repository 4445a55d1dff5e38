"""DS-MBNet: the slimmable MobileNetV1 (SE 0.25, Swish, no residuals) of the DS-Net release."""
from __future__ import annotations

from typing import Sequence

from torch import nn

from dsnet.models.blocks import ConvBNAct, GateUnit, SEUnit, Unit
from dsnet.models.net import DSNet, apply_init
from dsnet.models.spec import StageSpec, group_sizes, register

__all__ = ["DS_MBNET_STEM", "DS_MBNET_STAGES", "ds_mobilenet_v1"]

# Group 0 (stem + three stages, 2 choices) is at its slimmest in every static subnet and in the
# dynamic model; its wide choice exists for the largest route, the stage-one teacher.
# Group 1 (14 choices) is gated. These widths give the published 133..565 M MAdds and 820 M.
DS_MBNET_STEM = (16, 24)
DS_MBNET_STAGES = (
    StageSpec(choices=(32, 88), depth=1, stride=1, group=0),
    StageSpec(choices=(48, 168), depth=2, stride=2, group=0),
    StageSpec(choices=(96, 264), depth=2, stride=2, group=0),
    StageSpec(choices=tuple(range(224, 641, 32)), depth=6, stride=2, group=1, gated=True),
    StageSpec(choices=tuple(range(736, 1153, 32)), depth=2, stride=2, group=1),
)


def build_mobilenet_v1(stem: Sequence[int], stages: Sequence[StageSpec], num_classes: int,
                       routing_space: Sequence[int] | None, se_ratio: float = 0.25,
                       drop_rate: float = 0.0, in_chans: int = 3) -> DSNet:
    """Depthwise-separable blocks (dw 3x3 -> SE -> pw 1x1); the gate is the SE of the first
    block of the gated stage, so it sees that block's depthwise features."""
    act = nn.SiLU
    units: list[Unit] = [ConvBNAct((in_chans,), stem, 3, 2, act, group=0)]
    in_choices = tuple(stem)
    num_gated = len(stages[-1].choices)
    space = tuple(routing_space) if routing_space is not None else tuple(range(num_gated))
    for spec in stages:
        for d in range(spec.depth):
            units.append(ConvBNAct(in_choices, in_choices, spec.kernel, spec.stride if d == 0 else 1,
                                   act, depthwise=True))
            if spec.gated and d == 0:
                units.append(GateUnit(in_choices, len(space), se_ratio))
            else:
                units.append(SEUnit(in_choices, se_ratio))
            units.append(ConvBNAct(in_choices, spec.choices, 1, 1, act, group=spec.group))
            in_choices = spec.choices
    sizes = group_sizes([(0, len(stem))] + [(s.group, len(s.choices)) for s in stages])
    model = DSNet(units, num_classes, sizes, space, drop_rate, in_chans, (in_chans, 224, 224))
    model.default_interpolation = "bicubic"  # the DS-Net release's
    return model


@register
def ds_mobilenet_v1(num_classes: int = 1000, routing_space: Sequence[int] | None = (0, 1, 2, 3),
                    drop_rate: float = 0.0, in_chans: int = 3, init: str = "dsnet") -> DSNet:
    """DS-MBNet supernet: 14 static subnets (133-565 M MAdds), largest route 820 M, 7.7 M params.
    The gate routes among the 4 slimmest subnets by default, as the released model does.
    ``init="timm"`` initialises it as the release does (``apply_init``)."""
    return apply_init(build_mobilenet_v1(DS_MBNET_STEM, DS_MBNET_STAGES, num_classes, routing_space,
                                         drop_rate=drop_rate, in_chans=in_chans), init)
