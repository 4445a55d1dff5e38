"""Units: the steps a supernet walks, each slice-able and each with a plain dense twin.

Every unit takes ``forward(x, k, largest)``: its input width comes from ``x``, ``k`` is the choice
index of the width group that sets its output (ignored by width-preserving units), ``largest``
selects the largest route's own BN statistics. Each unit also
reports, as pure arithmetic, its output width, multiply-adds and parameter count at a given
input width and choice, and builds its dense twin (``dense``) from torch.nn layers only.
(``dsnet.models.plans`` turns a unit into a plain function for inference plans.)

MAdds follow the DS-Net convention: convolutions and linear layers, plus one add per input
element for average pooling; batch norm (foldable), activations and max pooling count 0.
"""
from __future__ import annotations

from itertools import repeat
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from dsnet.layers import DSBatchNorm2d, DSConv2d, DSGate, SqueezeExcite, check_choices
from dsnet.layers.heads import head_cost
from dsnet.models.routes import walk

__all__ = ["Unit", "ConvBNAct", "SEUnit", "GateUnit", "MaxPoolUnit", "Residual", "BasicBlock", "Bottleneck",
           "DenseBasicBlock", "DenseBottleneck", "conv_madds", "conv_params"]


def _out_size(size: int, kernel: int, stride: int) -> int:
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def conv_madds(in_c: int, out_c: int, kernel: int, hw: tuple[int, int], depthwise: bool = False) -> int:
    """Multiply-adds of a conv producing [out_c, *hw] (hw = output size)."""
    per_pixel = kernel * kernel * (out_c if depthwise else in_c * out_c)
    return per_pixel * hw[0] * hw[1]


def conv_params(in_c: int, out_c: int, kernel: int, depthwise: bool = False, bias: bool = False) -> int:
    return kernel * kernel * (out_c if depthwise else in_c * out_c) + (out_c if bias else 0)


class Unit(nn.Module):
    """Base of all units. ``group`` is the width group that sets the output (None: preserved)."""

    group: int | None = None

    def out_width(self, in_c: int, k: int) -> int:
        return in_c

    def cost(self, in_c: int, k: int, hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        """(multiply-adds, parameters, output hw) at input width ``in_c``, choice ``k``, input ``hw``."""
        raise NotImplementedError

    def dense(self, in_c: int, k: int, largest: bool = False) -> nn.Module:
        raise NotImplementedError


class ConvBNAct(Unit):
    """conv -> switchable BN -> activation (regular, pointwise or depthwise)."""

    def __init__(self, in_choices: Sequence[int], out_choices: Sequence[int], kernel: int = 1,
                 stride: int = 1, act: type[nn.Module] | None = nn.ReLU, depthwise: bool = False,
                 group: int | None = None) -> None:
        super().__init__()
        self.conv = DSConv2d(in_choices, out_choices, kernel, stride, depthwise)
        self.bn = DSBatchNorm2d(out_choices)
        self.act = act(inplace=True) if act is not None else nn.Identity()
        self.group = None if depthwise else group

    def forward(self, x: Tensor, k: int = -1, largest: bool = False) -> Tensor:
        """x: [B, C_in, H, W] -> [B, out_choices[k], H', W']; ``largest``: the largest route's BN row."""
        return self.act(self.bn(self.conv(x, k), largest))

    def out_width(self, in_c: int, k: int) -> int:
        return in_c if self.conv.depthwise else self.conv.out_choices[k]

    def cost(self, in_c, k, hw):
        return self.cost_at(in_c, self.out_width(in_c, k), hw)

    def cost_at(self, in_c: int, out_c: int, hw: tuple[int, int]) -> tuple[int, int, tuple[int, int]]:
        """``cost`` at any widths (``out_c`` = ``in_c`` when depthwise), not only the choices'."""
        c = self.conv
        hw = (_out_size(hw[0], c.kernel_size[0], c.stride[0]), _out_size(hw[1], c.kernel_size[0], c.stride[0]))
        madds = conv_madds(in_c, out_c, c.kernel_size[0], hw, c.depthwise)
        return madds, conv_params(in_c, out_c, c.kernel_size[0], c.depthwise) + 2 * out_c, hw

    def dense(self, in_c: int, k: int, largest: bool = False) -> nn.Sequential:
        return self.dense_at(in_c, self.out_width(in_c, k), largest)

    def dense_at(self, in_c: int, out_c: int, largest: bool = False) -> nn.Sequential:
        """``dense`` at any widths: the leading ``out_c`` filters over the leading ``in_c`` channels."""
        return nn.Sequential(self.conv.dense(in_c, out_c), self.bn.dense(out_c, largest), _copy_act(self.act))


def _copy_act(act: nn.Module) -> nn.Module:
    return type(act)(inplace=True) if hasattr(act, "inplace") else type(act)()


def _se_cost(se: SqueezeExcite, c: int, hw: tuple[int, int]) -> tuple[int, int]:
    h = se.hidden
    return c * hw[0] * hw[1] + 2 * c * h, c * h + h + h * c + c


class SEUnit(Unit):
    """Squeeze-and-excitation channel attention (width preserving)."""

    def __init__(self, choices: Sequence[int], ratio: float = 0.25) -> None:
        super().__init__()
        self.se = SqueezeExcite(choices, ratio)

    def forward(self, x: Tensor, k: int = -1, largest: bool = False) -> Tensor:
        return self.se(x)

    def cost(self, in_c, k, hw):
        return (*_se_cost(self.se, in_c, hw), hw)

    def dense(self, in_c: int, k: int, largest: bool = False) -> nn.Module:
        return self.se.dense(in_c)


class GateUnit(Unit):
    """The double-headed gate as a unit. Along a fixed route it applies channel attention only
    (head A); the width head runs in dynamic mode (``DSNet.forward_dynamic``)."""

    def __init__(self, choices: Sequence[int], num_routes: int, ratio: float = 0.25) -> None:
        super().__init__()
        self.gate = DSGate(choices, num_routes, ratio)

    def forward(self, x: Tensor, k: int = -1, largest: bool = False) -> Tensor:
        return self.gate(x)

    def cost(self, in_c, k, hw):
        return (*_se_cost(self.gate, in_c, hw), hw)

    def head_cost(self) -> tuple[int, int]:
        """(MAdds, parameters) of the width head, paid only when the gate routes."""
        return head_cost(self.gate.width_head)

    def dense(self, in_c: int, k: int, largest: bool = False) -> nn.Module:
        return self.gate.dense(in_c)


class MaxPoolUnit(Unit):
    """3x3 stride-2 max pooling (ResNet stem), width preserving."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = nn.MaxPool2d(3, 2, 1)

    def forward(self, x: Tensor, k: int = -1, largest: bool = False) -> Tensor:
        return self.pool(x)

    def cost(self, in_c, k, hw):
        return 0, 0, (_out_size(hw[0], 3, 2), _out_size(hw[1], 3, 2))

    def dense(self, in_c: int, k: int, largest: bool = False) -> nn.Module:
        return nn.MaxPool2d(3, 2, 1)


class Residual(Unit):
    """Shared logic of residual blocks: a body of ConvBNAct steps plus a shortcut."""

    body: nn.ModuleList

    def _init_shortcut(self, in_choices, out_choices, stride: int) -> None:
        check_choices(in_choices, "in_choices")
        self.projection = tuple(in_choices) != tuple(out_choices) or stride != 1
        self.shortcut = ConvBNAct(in_choices, out_choices, 1, stride, None) if self.projection else None
        nn.init.zeros_(self.body[-1].bn.weight)  # each block starts as its shortcut

    def forward(self, x: Tensor, k: int = -1, largest: bool = False) -> Tensor:
        """x: [B, C_in, H, W] -> [B, out_choices[k], H', W']."""
        shortcut = self.shortcut(x, k, largest) if self.shortcut is not None else x
        *steps, last = self.body  # not self.body[:-1]: that builds a ModuleList per call
        for step in steps:
            x = step(x, k, largest)
        return torch.relu_(last(x, k, largest) + shortcut)

    def out_width(self, in_c: int, k: int) -> int:
        return self.body[-1].out_width(in_c, k)

    def body_walk(self, in_c: int, k: int) -> Iterator[tuple[ConvBNAct, int, int]]:
        """(step, its input width, k) for the body's steps at block input width ``in_c``."""
        return walk(self.body, repeat(k), in_c)

    def cost(self, in_c, k, hw):
        madds = params = 0
        out_hw = hw
        for step, c, _ in self.body_walk(in_c, k):
            m, p, out_hw = step.cost(c, k, out_hw)
            madds, params = madds + m, params + p
        if self.shortcut is not None:
            m, p, _ = self.shortcut.cost(in_c, k, hw)
            madds, params = madds + m, params + p
        return madds, params, out_hw

    def _dense_parts(self, in_c: int, k: int, largest: bool) -> tuple[list[nn.Module], nn.Module | None]:
        steps = [step.dense(c, k, largest) for step, c, _ in self.body_walk(in_c, k)]
        return steps, self.shortcut.dense(in_c, k, largest) if self.shortcut is not None else None


class BasicBlock(Residual):
    """ResNet basic block: 3x3 -> 3x3, identity or 1x1 projection shortcut."""

    def __init__(self, in_choices: Sequence[int], out_choices: Sequence[int], stride: int, group: int) -> None:
        super().__init__()
        self.group = group
        self.body = nn.ModuleList([ConvBNAct(in_choices, out_choices, 3, stride, nn.ReLU),
                                   ConvBNAct(out_choices, out_choices, 3, 1, None)])
        self._init_shortcut(in_choices, out_choices, stride)

    def dense(self, in_c: int, k: int, largest: bool = False) -> "DenseBasicBlock":
        steps, shortcut = self._dense_parts(in_c, k, largest)
        return DenseBasicBlock(nn.Sequential(*steps), shortcut)


class Bottleneck(Residual):
    """ResNet bottleneck (v1.5, stride on the 3x3): 1x1 -> 3x3 -> 1x1 (x4 wider)."""

    def __init__(self, in_choices: Sequence[int], mid_choices: Sequence[int], out_choices: Sequence[int],
                 stride: int, group: int) -> None:
        super().__init__()
        self.group = group
        self.body = nn.ModuleList([ConvBNAct(in_choices, mid_choices, 1, 1, nn.ReLU),
                                   ConvBNAct(mid_choices, mid_choices, 3, stride, nn.ReLU),
                                   ConvBNAct(mid_choices, out_choices, 1, 1, None)])
        self._init_shortcut(in_choices, out_choices, stride)

    def dense(self, in_c: int, k: int, largest: bool = False) -> "DenseBottleneck":
        steps, shortcut = self._dense_parts(in_c, k, largest)
        return DenseBottleneck(nn.Sequential(*steps), shortcut)


class DenseBasicBlock(nn.Module):
    """Plain residual block: ``relu(body(x) + shortcut(x))`` (shortcut: identity when None)."""

    def __init__(self, body: nn.Sequential, shortcut: nn.Module | None) -> None:
        super().__init__()
        self.body = body
        self.shortcut = shortcut if shortcut is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class DenseBottleneck(DenseBasicBlock):
    """Plain bottleneck block (same computation as DenseBasicBlock, named for readability)."""
