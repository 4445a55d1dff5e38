"""Network Slimming (Liu et al., ICCV 2017), one of the architecture-finding methods of Liu et al.
(ICLR 2019).

1. **Sparsity training.** The full model (the largest route as a plain model) trains with an L1
   penalty ``s * sum |gamma|`` on every batch norm's scale factors: after backward, before the
   optimizer step, ``s * sign(gamma)`` is added to each BN weight's gradient, as the paper's code
   does (``add_bn_subgradient``; ``attach_bn_subgradient`` does it inside every
   ``optimizer.step()``, so after GradScaler's unscaling and once per accumulated step).
   ``s`` defaults to the paper's 1e-4.
2. **Pruning** (``slimming_prune``), in the channel spaces of ``dsnet.prune.channels``: a channel's score
   is the largest ``|gamma|`` over the batch norms on it (a residual stream's channel is scaled by
   the BN of every conv that writes into it, and is dropped only if all of them are small; a
   depthwise conv's BN joins its space's). One global threshold over all channels of all spaces
   at ratio ``r``: ``n = round(r * N)`` of the ``N`` channels are to go, the threshold ``t`` is the
   ``n``-th smallest score, and exactly the channels whose score is ``> t`` are kept, so channels
   tied with ``t`` all go (the paper's code takes the ``n+1``-th smallest as ``t``, one channel
   more). A space left empty keeps its best channel (the lowest index among ties).
3. **Fine-tuning** of the plain model with the kept channels' weights, or training the found
   ``Architecture`` from scratch (``dsnet.prune.arch.fresh_plain``, Scratch-E / Scratch-B).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from dsnet.errors import UserError
from dsnet.layers import DSBatchNorm2d
from dsnet.models.net import DenseNet, DSNet
from dsnet.prune.arch import Architecture, architecture, build_plain, named_spaces
from dsnet.prune.channels import ChannelSpace, implant

__all__ = ["SPARSITY", "add_bn_subgradient", "attach_bn_subgradient", "channel_scores", "global_keep",
           "slimming_prune"]

SPARSITY = 1e-4  # the paper's s for CIFAR


def _bn_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm2d, DSBatchNorm2d))]


@torch.no_grad()
def add_bn_subgradient(model: nn.Module, sparsity: float = SPARSITY) -> None:
    """Add ``sparsity * sign(gamma)`` to the gradient of every batch norm weight of ``model``
    (the subgradient of ``sparsity * sum |gamma|``); a BN without a gradient is left alone."""
    for bn in _bn_modules(model):
        if bn.weight.grad is not None:
            bn.weight.grad.add_(torch.sign(bn.weight), alpha=sparsity)


def attach_bn_subgradient(optimizer: torch.optim.Optimizer, model: nn.Module,
                          sparsity: float = SPARSITY) -> RemovableHandle:
    """Run ``add_bn_subgradient`` at the start of every ``optimizer.step()``; returns the handle."""
    if not sparsity >= 0.0:
        raise UserError(f"--slimming-sparsity must be a non-negative L1 strength (the paper's 1e-4), got {sparsity}")
    return optimizer.register_step_pre_hook(lambda opt, args, kwargs: add_bn_subgradient(model, sparsity))


def channel_scores(supernet: DSNet, spaces: dict[str, ChannelSpace]) -> dict[str, Tensor]:
    """Per space, the largest |gamma| over the batch norms on it: [C] each."""
    gammas = {id(m.weight) for m in _bn_modules(supernet)}
    scores = {}
    for name, space in spaces.items():
        on = [t.detach().abs() for t, dim in space.members if dim == 0 and id(t) in gammas]
        scores[name] = torch.stack(on).amax(0)
    return scores


def global_keep(scores: dict[str, Tensor], ratio: float) -> tuple[float, dict[str, Tensor]]:
    """(the threshold t, per space the indices (ascending) of the channels with score > t) at
    pruning ratio ``ratio`` in [0, 1): ``t`` is the ``round(ratio * N)``-th smallest score (-inf
    when that is 0); a space with no channel above ``t`` keeps its best one."""
    if not 0.0 <= ratio < 1.0:
        raise UserError(f"--ratio must be the fraction in [0, 1) of channels to prune, got {ratio}")
    flat = torch.cat(list(scores.values()))
    n = round(ratio * flat.numel())
    threshold = float(torch.sort(flat).values[n - 1]) if n > 0 else float("-inf")
    keep = {}
    for name, s in scores.items():
        kept = (s > threshold).nonzero().flatten()
        keep[name] = kept if kept.numel() else s.argmax().view(1)  # argmax: the first of the ties
    return threshold, keep


def slimming_prune(supernet: DSNet, large: DenseNet, ratio: float) -> tuple[Architecture, DenseNet]:
    """Prune ``large`` (the largest route as a plain model, trained with the BN penalty) at
    ``ratio`` by one global threshold on |gamma|: (the found architecture, the plain model with
    the kept channels' weights and statistics). ``supernet`` receives ``large``'s weights."""
    net = implant(supernet, large)
    spaces = named_spaces(net)
    _, keep = global_keep(channel_scores(net, spaces), ratio)
    arch = architecture(net, {n: len(k) for n, k in keep.items()})
    return arch, build_plain(net, arch, keep)
