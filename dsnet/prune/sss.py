"""Sparse Structure Selection (Huang & Wang, ECCV 2018): learning which residual blocks to keep,
one of the architecture-finding methods of Liu et al. (ICLR 2019).

1. **Scale factors.** Every residual block with an identity shortcut (the only ones that can be
   removed: a projection shortcut changes the stream's shape) gets a learnable factor on its
   branch, ``relu(lambda * body(x) + x)``, starting at 1 (``add_scales`` on the largest route as
   a plain model).
2. **Sparsity training** with their accelerated proximal gradient (APG) on the factors and the
   run's own optimizer on everything else (``attach_apg``). Per step, with the factors' learning
   rate ``lr`` (their parameter group's, so the schedule applies), momentum ``mu`` and sparsity
   ``gamma`` (the paper's reformulated APG, their Eq. 10-12; no weight decay on the factors)::

       z      = soft_threshold(lambda - lr * grad, lr * gamma)
       v      = z - lambda + mu * v
       lambda = z + mu * v

   ``soft_threshold(x, t) = sign(x) max(|x| - t, 0)`` is the proximal operator of ``t |x|``. A
   factor becomes exactly zero once ``z`` has been zero for two steps in a row. (The L1
   subgradient, as Network Slimming uses, never lands on zero, so it could not remove a block.)
3. **Removal** (``sss_prune``): the blocks whose factor is exactly zero are removed, giving a
   shallower ``Architecture`` (every width full); the other factors are folded into their
   branch's last batch norm (its weight and bias times lambda), so the shallower plain model
   computes what the scaled network computes (a removed block passes its input, which a ReLU
   made non-negative, through unchanged). Then fine-tuning, or Scratch-E / Scratch-B of the
   architecture.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dsnet.models.blocks import DenseBasicBlock
from dsnet.models.net import DenseNet, DSNet
from dsnet.prune.arch import Architecture, build_plain, full_architecture, removable_blocks
from dsnet.prune.channels import implant

__all__ = ["SPARSITY", "MOMENTUM", "ScaledBlock", "add_scales", "scale_keys", "soft_threshold", "apg_update", "attach_apg",
           "zero_blocks", "fold_scales", "sss_prune"]

SPARSITY = 1e-2  # gamma; the paper's CIFAR runs use 1e-2 to 1e-1 (larger removes more blocks)
MOMENTUM = 0.9


class ScaledBlock(nn.Module):
    """A plain residual block with an identity shortcut and a factor on its branch:
    x [B, C, H, W] -> relu(scale * body(x) + x), same shape."""

    def __init__(self, block: DenseBasicBlock) -> None:
        super().__init__()
        if not isinstance(block.shortcut, nn.Identity):
            raise ValueError("only a residual block with an identity shortcut can take a branch factor")
        self.body, self.kind = block.body, type(block)
        p = next(block.body.parameters())
        self.scale = nn.Parameter(torch.ones((), device=p.device, dtype=p.dtype))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.scale * self.body(x) + x)


def add_scales(plain: DenseNet, supernet: DSNet) -> list[nn.Parameter]:
    """Wrap every removable block of ``plain`` (``supernet``'s largest route as a plain model:
    ``features[i]`` is unit ``i``) in a ScaledBlock, in place; returns the factors, in unit order."""
    for i in removable_blocks(supernet):
        plain.features[i] = ScaledBlock(plain.features[i])
    return [plain.features[i].scale for i in removable_blocks(supernet)]


def scale_keys(weights: Mapping[str, Tensor]) -> list[str]:
    """The keys of the branch factors in a plain model's state dict (``features.<i>.scale``; none
    unless the model went through ``add_scales``)."""
    return [k for k in weights if k.endswith(".scale")]


def soft_threshold(x: Tensor, t: float) -> Tensor:
    """sign(x) max(|x| - t, 0), elementwise: the proximal operator of ``t |x|``."""
    return x.sign() * (x.abs() - t).clamp_min(0)


@torch.no_grad()
def apg_update(scale: Tensor, grad: Tensor, velocity: Tensor, lr: float, momentum: float, gamma: float) -> None:
    """One APG step (module docs) on ``scale`` and its ``velocity``, in place."""
    z = soft_threshold(scale - lr * grad, lr * gamma)
    velocity.mul_(momentum).add_(z - scale)
    scale.copy_(z + momentum * velocity)


def attach_apg(optimizer: torch.optim.Optimizer, scales: list[nn.Parameter], gamma: float = SPARSITY,
               momentum: float = MOMENTUM) -> list[RemovableHandle]:
    """Update ``scales`` (parameters of ``optimizer``) by APG instead of ``optimizer``'s own rule:
    at the start of each ``optimizer.step()`` their gradients are taken away (so it skips them),
    at its end ``apg_update`` runs with their group's learning rate. The velocity is kept in
    ``optimizer.state[scale]["apg_velocity"]``, so the optimizer's state dict holds it."""
    groups = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    if any(id(p) not in groups for p in scales):
        raise ValueError("the branch factors must be parameters of the optimizer (their group sets their lr)")
    taken: dict[int, Tensor | None] = {}

    def take(opt, args, kwargs) -> None:
        for p in scales:
            taken[id(p)], p.grad = p.grad, None

    def update(opt, args, kwargs) -> None:
        for p in scales:
            grad = taken.pop(id(p), None)
            state = opt.state[p]
            if "apg_velocity" not in state:
                state["apg_velocity"] = torch.zeros_like(p)
            apg_update(p, torch.zeros_like(p) if grad is None else grad, state["apg_velocity"],
                       groups[id(p)]["lr"], momentum, gamma)

    return [optimizer.register_step_pre_hook(take), optimizer.register_step_post_hook(update)]


def zero_blocks(plain: DenseNet) -> list[int]:
    """Indices (into ``plain.features``, i.e. unit indices) of the blocks whose factor is exactly 0."""
    return [i for i, m in enumerate(plain.features) if isinstance(m, ScaledBlock) and float(m.scale.detach()) == 0.0]


@torch.no_grad()
def fold_scales(plain: DenseNet) -> DenseNet:
    """Replace every ScaledBlock of ``plain`` by its plain block with the factor folded into the
    branch's last batch norm (weight and bias times the factor), in place; returns ``plain``."""
    for i, m in enumerate(plain.features):
        if isinstance(m, ScaledBlock):
            bn = [b for b in m.body.modules() if isinstance(b, nn.BatchNorm2d)][-1]
            bn.weight.mul_(m.scale)
            bn.bias.mul_(m.scale)
            plain.features[i] = m.kind(m.body, None)
    return plain


def sss_prune(supernet: DSNet, plain: DenseNet) -> tuple[Architecture, DenseNet]:
    """(the architecture without ``plain``'s zero-factor blocks, that architecture as a plain
    model holding ``plain``'s weights with the other factors folded in). ``plain`` is the scaled
    largest route (``add_scales``) after sparsity training; it is folded in place and
    ``supernet`` receives its weights."""
    removed = zero_blocks(plain)
    net = implant(supernet, fold_scales(plain))
    arch = full_architecture(net, removed)
    return arch, build_plain(net, arch)
