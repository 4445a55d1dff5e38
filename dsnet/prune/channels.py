"""L1-norm channel pruning (Li et al., ICLR 2017), the static-pruning baseline of Liu et al. (2019).

A model trained along the largest route is pruned to the width of static subnet ``i``: in every
channel space the channels whose filters have the largest L1 norms are kept, the rest dropped,
and the result is a plain model with subnet ``i``'s shape (and MAdds).

How dsnet does it: the supernet's channels are permuted so that the kept channels of every space
come first (a permutation applied to every tensor that reads or writes the space leaves the
network's function unchanged), then the leading channels are sliced out exactly as
``extract_subnet`` slices a subnet, with the largest route's BN statistics.

A *channel space* is a set of channels that must be kept or dropped together:

- a convolution's output, read by the next layer (depthwise convs and squeeze-excite stay in it);
- a residual stream: the channels a stem or projection shortcut writes and every block of the
  stage adds to. Its filters are ranked by the sum of their L1 norms over all the convolutions
  that write into it (Li et al. prune only inside blocks; a subnet's width also narrows the
  streams, so dsnet ranks them jointly).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from dsnet.layers import DSBatchNorm2d, SqueezeExcite
from dsnet.models.blocks import ConvBNAct, GateUnit, MaxPoolUnit, Residual, SEUnit
from dsnet.models.net import DenseNet, DSNet

__all__ = ["ChannelSpace", "channel_spaces", "l1_scores", "l1_keep", "implant", "prune_to", "l1_prune"]


@dataclass
class ChannelSpace:
    """Channels kept or dropped together: the tensors indexing them and the filters writing them."""

    width: int                                                   # channels kept at the target route
    members: list[tuple[Tensor, int]] = field(default_factory=list)  # (tensor, dim) indexing the space
    writers: list[Tensor] = field(default_factory=list)          # conv weights [C, ...] writing it
    readers: list[nn.Module] = field(default_factory=list)       # convs (groups 1) and the classifier reading it


def channel_spaces(model: DSNet, subnet: int) -> list[ChannelSpace]:
    """The channel spaces of ``model`` (full width) with their widths at static subnet ``subnet``."""
    spaces: list[ChannelSpace] = []
    route = model.routes.static(subnet)

    def new(width: int) -> ChannelSpace:
        spaces.append(ChannelSpace(width))
        return spaces[-1]

    def conv_bn(unit: ConvBNAct, src: ChannelSpace | None, dst: ChannelSpace | None, width: int) -> ChannelSpace:
        conv, bn = unit.conv, unit.bn
        if conv.depthwise:
            dst = src
        else:
            if src is not None:
                src.members.append((conv.weight, 1))
                src.readers.append(conv)
            dst = dst or new(width)
            dst.writers.append(conv.weight)
        dst.members += [(conv.weight, 0), *_bn_members(bn)]
        return dst

    cur: ChannelSpace | None = None  # the image's channels are never pruned
    for unit, c, k in model.route_walk(route):
        if isinstance(unit, ConvBNAct):
            cur = conv_bn(unit, cur, None, unit.out_width(c, k))
        elif isinstance(unit, (SEUnit, GateUnit)):
            _se_members(unit.se if isinstance(unit, SEUnit) else unit.gate, cur)
        elif isinstance(unit, Residual):
            stream = cur if unit.shortcut is None else new(unit.out_width(c, k))
            if unit.shortcut is not None:
                conv_bn(unit.shortcut, cur, stream, stream.width)
            *steps, (last, _, _) = unit.body_walk(c, k)
            x = cur
            for step, xc, _ in steps:
                x = conv_bn(step, x, None, step.out_width(xc, k))
            conv_bn(last, x, stream, stream.width)
            cur = stream
        elif not isinstance(unit, MaxPoolUnit):
            raise TypeError(f"L1 pruning does not know the unit {type(unit).__name__}")
    cur.members.append((model.classifier.weight, 1))
    cur.readers.append(model.classifier)
    return spaces


def _bn_members(bn: DSBatchNorm2d) -> list[tuple[Tensor, int]]:
    return [(bn.weight, 0), (bn.bias, 0), (bn.running_mean, 1), (bn.running_var, 1)]


def _se_members(se: SqueezeExcite, space: ChannelSpace) -> None:
    space.members += [(se.reduce.weight, 1), (se.expand.weight, 0), (se.expand.bias, 0)]


def l1_scores(space: ChannelSpace) -> Tensor:
    """Per-channel L1 norm of the filters writing ``space``, summed over its writers: [C]."""
    return torch.stack([w.detach().abs().flatten(1).sum(1) for w in space.writers]).sum(0)


def l1_keep(space: ChannelSpace) -> Tensor:
    """Indices (ascending) of the ``space.width`` channels with the largest L1 scores."""
    return torch.topk(l1_scores(space), space.width, sorted=False).indices.sort().values


@torch.no_grad()
def implant(model: DSNet, dense: DenseNet) -> DSNet:
    """Write a plain model of ``model``'s largest route (``extract_subnet(model, "largest")``'s
    layout, e.g. a trained Scratch-E baseline) into ``model``: its weights, and its BN statistics
    into the largest route's rows. Returns ``model``."""
    targets = [p for name, p in model.named_parameters() if "width_head" not in name]
    sources = list(dense.parameters())
    if [t.shape for t in targets] != [s.shape for s in sources]:
        raise ValueError(f"the plain model does not have the shape of {model.model_name}'s largest route")
    for t, s in zip(targets, sources):
        t.copy_(s)
    bns = [m for m in model.modules() if isinstance(m, DSBatchNorm2d)]
    plain = [m for m in dense.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, p in zip(bns, plain, strict=True):
        row = len(bn.choices)
        bn.running_mean[row].copy_(p.running_mean)
        bn.running_var[row].copy_(p.running_var)
        bn.num_batches_tracked[row] = p.num_batches_tracked
    return model


@torch.no_grad()
def prune_to(model: DSNet, subnet: int, choose: Callable[[ChannelSpace], Tensor]) -> DenseNet:
    """Prune ``model``'s largest route to the shape of static subnet ``subnet``, keeping in every
    channel space the channels ``choose(space)`` returns (``space.width`` indices); returns a plain
    model. ``model`` is permuted in place (its largest route computes the same function afterwards,
    up to what ``choose`` itself rewrites)."""
    for space in channel_spaces(model, subnet):
        keep = choose(space)
        rest = torch.ones(space.writers[0].shape[0], dtype=torch.bool, device=keep.device)
        rest[keep] = False
        order = torch.cat([keep, rest.nonzero().flatten()])
        for tensor, dim in space.members:
            tensor.copy_(tensor.index_select(dim, order))
    return model.extract(model.routes.static(subnet), largest_stats=True)


def l1_prune(model: DSNet, subnet: int) -> DenseNet:
    """Prune ``model``'s largest route (trained weights, largest-route BN statistics) to the
    shape of static subnet ``subnet`` by L1 norm; returns a plain model. ``model`` is permuted
    in place (its largest route computes the same function afterwards)."""
    return prune_to(model, subnet, l1_keep)
